"""What the emulated-kernel test files share: the kernels, built once per test session (and cached
on disk across sessions), and a registry of which test launches which kernel."""

from __future__ import annotations

import functools

import numpy as np

from crystal.backends.kernels import column_sum_grids
from emu.build import EmulatedKernels, build

_kernels: EmulatedKernels | None = None

# Llama's kernel files: every kernel in them, fp32 and bf16, is tested by tests/test_llama_kernels_emulated.py
LLAMA_FILES = ("rmsnorm.cu", "rope.cu", "swiglu.cu")


def gpu() -> EmulatedKernels:
    """The emulated kernels of kernels/*.cu."""
    global _kernels
    if _kernels is None:
        _kernels = build()
    return _kernels


def launch_column_sums(name: str, block: int, outs, inputs, n_rows: int, cols: int, launch_partial=None):
    """`name`_partial, then `name`_sum, as the cuda backend launches them (CudaBackend._column_sums):
    outs[k][c] = the k-th column sum over n_rows rows. launch_partial(name, grid, block, *args):
    how to launch the first stage (a bf16 test's twin launcher; default gpu().launch)."""
    parts, partial_grid, sum_grid = column_sum_grids(n_rows, cols, len(outs), block)
    partial = np.full((len(outs) * parts, cols), np.nan, np.float32)  # every element is written
    (launch_partial or gpu().launch)(name + "_partial", partial_grid, block, partial, *inputs, n_rows, cols)
    gpu().launch(name + "_sum", sum_grid, block, *outs, partial, parts, cols)


class Coverage:
    """kernel name -> the first test that launches it, filled at import (so independent of test
    order) by the `covers` decorator; a decorated test fails unless it launches them all."""

    def __init__(self):
        self.covered: dict[str, str] = {}

    def covers(self, *names):
        def register(test):
            for name in names:
                self.covered.setdefault(name, test.__name__)

            @functools.wraps(test)
            def run(*args, **kwargs):
                gpu().launched.clear()
                test(*args, **kwargs)
                missing = set(names) - gpu().launched
                assert not missing, f"{test.__name__} never launched {sorted(missing)}"
            return run
        return register
