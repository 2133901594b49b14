"""GradientReducer: one gradient slot per micro-batch, summed in a fixed binary tree.

Slot m holds the gradient of micro-batch m, whichever sphere computed it. The sum is folded
over slot index (stride 1, 2, 4, ...: slot i += slot i+stride), an order that depends only on
M, so the step gradient is bitwise the same for any number of spheres. The tree is the same
one the multi-process reducer uses across ranks (ranks own whole subtrees).

The flat buffer is cut into CHUNKS fixed pieces, a number independent of the sphere count;
spheres reduce chunks in parallel, each returning its chunk's sum of squares, and the root adds
those partial sums in chunk order: the gradient norm, too, is the same for any sphere count.
"""

from __future__ import annotations

import math

import numpy as np

CHUNKS = 48  # divides evenly among 1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 spheres


def tree_pairs(n: int) -> list[tuple[int, int]]:
    """The (dst, src) additions of the fixed binary tree over n slots, in order."""
    pairs, stride = [], 1
    while stride < n:
        pairs += [(i, i + stride) for i in range(0, n - stride, 2 * stride)]
        stride *= 2
    return pairs


def tree_mean(values: list[float]) -> float:
    """Mean of values summed over the fixed tree (losses of micro-batches or eval batches)."""
    vals = list(values)
    for dst, src in tree_pairs(len(vals)):
        vals[dst] += vals[src]
    return vals[0] / len(vals)


def chunk_bounds(size: int, chunks: int = CHUNKS) -> list[tuple[int, int]]:
    """Fixed [start, end) pieces of a flat buffer, 16-element aligned (some may be empty)."""
    step = -(-size // chunks)
    step = -(-step // 16) * 16
    return [(min(c * step, size), min((c + 1) * step, size)) for c in range(chunks)]


class GradientReducer:
    def __init__(self, be, size: int, micro_batches: int):
        self.be = be
        self.M = micro_batches
        self.size = size
        self.slots = be.empty((micro_batches, size))  # allocated once, reused every step
        self.pairs = np.array(tree_pairs(micro_batches), dtype=np.int64).reshape(-1, 2)  # host
        self.chunks = chunk_bounds(size)

    def slot(self, m: int):
        return self.slots[m]

    @property
    def grad(self):
        """The mean gradient, in slot 0 once every chunk is reduced."""
        return self.slots[0]

    def reduce_chunk(self, c: int) -> float:
        """Tree-sum chunk c of the slots into slot 0, scaled by 1/M; its sum of squares."""
        start, end = self.chunks[c]
        if start == end:
            return 0.0
        return self.be.reduce_slots(self.slots, self.pairs, start, end, 1.0 / self.M)

    def reduce(self) -> float:
        """All chunks on the calling thread; returns the gradient norm."""
        return norm_of([self.reduce_chunk(c) for c in range(len(self.chunks))])

    def reduce_losses(self, losses: list[float]) -> float:
        """Mean micro-batch loss, summed over the same tree."""
        return tree_mean(losses)


def norm_of(partial_sums: list[float]) -> float:
    """sqrt of per-chunk sums of squares added in chunk order."""
    total = 0.0
    for p in partial_sums:
        total += p
    return math.sqrt(total)
