"""How tests compare tensors: relative error of a tensor = max |a - b| / max |b|."""

import numpy as np


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


def worst_rel_err(actual: dict, expected: dict) -> tuple[str, float]:
    """(name, error) of the tensor of `actual` furthest from `expected`."""
    errors = {k: rel_err(actual[k], expected[k]) for k in expected}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]
