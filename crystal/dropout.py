"""Dropout masks as a pure function of (run seed, step, micro-batch, layer, site, element).

A sphere computes the masks of the micro-batch it holds from these numbers alone, so the result
never depends on which sphere (thread, stream or rank) ran it, and a resumed run draws the
masks it would have drawn. Both backends hash the same way, in 64-bit integer arithmetic:

    z = key + (i + 1) * 0x9E3779B97F4A7C15  (mod 2^64); splitmix64's finalizer on z
    keep element i  <=>  (z >> 32) >= threshold,  threshold = round(p * 2^32)
    out[i] = inp[i] * (1 / (1 - p)) if kept else 0

The same op serves forward and backward: the backward applies the forward's mask to the
gradient. Sites follow nanoGPT: the embedding sum (layer 0, site 0), each layer's attention
probabilities [B,NH,T,T] (site 3), and the outputs of its attention projection (site 1) and MLP
projection (site 2) before they join the residual stream. Evaluation and sampling never drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's
EMBEDDING, ATTENTION_PROJ, MLP_PROJ, ATTENTION_PROBS = 0, 1, 2, 3


def splitmix64(z: int) -> int:
    """splitmix64's output function on a 64-bit integer (Python ints, wrapped to 64 bits)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class Dropout:
    """The dropout of one micro-batch: probability p and where the micro-batch sits in the run."""

    p: float
    seed: int
    step: int  # 0-based optimizer step
    micro: int  # micro-batch index within the step (global, across ranks)

    @property
    def threshold(self) -> int:
        return min(round(self.p * 2 ** 32), 2 ** 32 - 1)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    @cached_property
    def _micro_key(self) -> int:
        """The hash chain over (seed, step, micro-batch), shared by every site of the micro-batch."""
        z = splitmix64(self.seed + GOLDEN)
        for part in (self.step, self.micro):
            z = splitmix64(z ^ (part + GOLDEN))
        return z

    def key(self, layer: int, site: int) -> int:
        """A 63-bit key per (seed, step, micro-batch, layer, site): it travels as a signed int64."""
        z = self._micro_key
        for part in (layer, site):
            z = splitmix64(z ^ (part + GOLDEN))
        return z >> 1

    def keys(self, n_layer: int) -> list[int]:
        """Every site's key for an n_layer model, in a fixed order (the cuda backend stages them
        in device memory, where its dropout kernel reads them)."""
        sites = [(0, EMBEDDING)] + [(l, s) for l in range(n_layer) for s in (ATTENTION_PROJ, MLP_PROJ, ATTENTION_PROBS)]
        return [self.key(l, s) for l, s in sites]

    def site(self, layer: int, site: int) -> tuple[int, int, float]:
        """(key, threshold, scale): the arguments of a backend's dropout op at one site."""
        return self.key(layer, site), self.threshold, self.scale

    def apply(self, be, out, inp, layer: int, site: int) -> None:
        """out = inp * mask * scale on backend be (out may be inp)."""
        be.dropout(out, inp, *self.site(layer, site))


def keep_mask(key: int, threshold: int, n: int) -> np.ndarray:
    """The reference mask (numpy, vectorized): True where element i of n is kept."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(32)) >= np.uint64(threshold)


def for_step(p: float, seed: int, step: int, micro: range) -> list[Dropout] | None:
    """Each micro-batch's Dropout for one step (micro: the global indices held here), or None."""
    if p <= 0.0:
        return None
    return [Dropout(p, seed, step, m) for m in micro]
