"""GradientReducer: one gradient slot per micro-batch, summed in a fixed binary tree.

Slot m holds the gradient of micro-batch m, whichever sphere computed it. The sum is folded
over slot index (stride 1, 2, 4, ...: slot i += slot i+stride), an order that depends only on
M, so the step gradient is bitwise the same for any number of spheres. The tree is the same
one the multi-process reducer uses across ranks (ranks own whole subtrees).
"""

from __future__ import annotations


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


class GradientReducer:
    def __init__(self, be, size: int, micro_batches: int):
        self.be = be
        self.M = micro_batches
        self.slots = be.empty((micro_batches, size))  # allocated once, reused every step
        self._pairs = tree_pairs(micro_batches)

    def slot(self, m: int):
        return self.slots[m]

    def reduce(self):
        """Mean gradient over the M slots, in slot 0 (the other slots are left as scratch)."""
        for dst, src in self._pairs:
            self.be.add_inplace(self.slots[dst], self.slots[src])
        self.be.scale_inplace(self.slots[0], 1.0 / self.M)
        return self.slots[0]

    def reduce_losses(self, losses: list[float]) -> float:
        """Mean micro-batch loss, summed over the same tree."""
        return tree_mean(losses)
