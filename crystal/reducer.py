"""GradientReducer: one gradient slot per micro-batch, summed in a fixed binary tree.

Slot m holds the gradient of micro-batch m, whichever sphere computed it. The sum is folded
over slot index (stride 1, 2, 4, ...: slot i += slot i+stride), an order that depends only on
M, so the step gradient is bitwise the same for any number of spheres.

Across R ranks the tree is the same tree. Rank r computes the micro-batches
[r M / R, (r+1) M / R) (integer division) and owns every subtree that lies inside that range:
it sums them itself (phase A), sends the roots of its largest ones (one buffer per rank, all
ranks' in one all-gather), and every rank then finishes the tree's remaining additions over
those roots (phase B) in the tree's order. Each addition is the one a single process does, on
the same operands, so the mean gradient is bitwise the single-process one for any R <= M.
When M / R is a power of two each rank sends exactly one root (its whole subtree); otherwise a
range's edges cut subtrees and a rank sends one root per whole subtree it holds (M = 12 on 2
ranks: [0,4)+[4,6) and [6,8)+[8,12)); with R = M every slot is sent.

The flat buffer is cut into CHUNKS fixed pieces, a number independent of the sphere count;
spheres reduce chunks in parallel, each returning its chunk's sum of squares, and the root adds
those partial sums in chunk order: the gradient norm, too, is the same for any sphere count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crystal.errors import CrystalError
from crystal.world import Comm, rank_ranges

CHUNKS = 48  # divides evenly among 1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 spheres


def tree_pairs(n: int) -> list[tuple[int, int]]:
    """The (dst, src) additions of the fixed binary tree over n slots, in order."""
    pairs, stride = [], 1
    while stride < n:
        pairs += [(i, i + stride) for i in range(0, n - stride, 2 * stride)]
        stride *= 2
    return pairs


@dataclass(frozen=True)
class TreeSplit:
    """The fixed tree over M slots cut along rank ranges (slot indices are global)."""

    ranges: list[range]
    local: list[list[tuple[int, int]]]  # per rank: additions inside its range, in tree order
    roots: list[list[int]]  # per rank: slots whose partial sums it sends, ascending
    top: list[tuple[int, int]]  # additions across ranges, in tree order (done by every rank)

    @property
    def roots_per_rank(self) -> int:
        """Rows each rank contributes to the exchange: the most roots any rank sends."""
        return max(len(r) for r in self.roots)


def split_tree(n: int, ranks: int) -> TreeSplit:
    ranges = rank_ranges(n, ranks)
    owner = [r for r, rg in enumerate(ranges) for _ in rg]
    local: list[list[tuple[int, int]]] = [[] for _ in ranges]
    top = []
    for dst, src in tree_pairs(n):
        end = min(dst + 2 * (src - dst), n)  # the pair sums slots [dst, end)
        if owner[dst] == owner[end - 1]:
            local[owner[dst]].append((dst, src))
        else:
            top.append((dst, src))
    sent = sorted({0} | {i for pair in top for i in pair})
    roots = [[i for i in sent if owner[i] == r] for r in range(ranks)]
    return TreeSplit(ranges, local, roots, top)


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
    """The step's gradient slots on this rank, and the tree that sums them (see the module doc).

    `slot(j)` is the j-th micro-batch of this rank's range; `reduce(map)` sums everything and
    returns the gradient norm, running the per-chunk work through `map(n_items, work)` (the
    spheres); `grad` is then the mean gradient, the same buffer contents on every rank."""

    def __init__(self, be, size: int, micro_batches: int, comm=None):
        self.be = be
        self.M = micro_batches
        self.size = size
        self.comm = comm if comm is not None else Comm()
        ranks, rank = self.comm.size, self.comm.rank
        if micro_batches < ranks:
            raise CrystalError(f"--micro-batches {micro_batches} is fewer than the {ranks} ranks; "
                               "every rank needs at least one micro-batch")
        self.split = split_tree(micro_batches, ranks)
        self.owned = self.split.ranges[rank]
        lo = self.owned.start
        self.slots = be.empty((len(self.owned), size))  # allocated once, reused every step
        self.pairs = _pair_array([(d - lo, s - lo) for d, s in self.split.local[rank]])  # host
        self.chunks = chunk_bounds(size)
        self.top = None
        if ranks > 1:
            # every rank's roots in a [R * k, size] buffer, rank r's at rows k r ...; the tree's
            # remaining additions are remapped onto those rows (slot 0 is row 0)
            k = self.split.roots_per_rank
            row = {i: r * k + j for r, rs in enumerate(self.split.roots) for j, i in enumerate(rs)}
            self.top = be.empty((ranks * k, size))
            self.top_pairs = _pair_array([(row[d], row[s]) for d, s in self.split.top])
            self._pack = [(rank * k + j, i - lo) for j, i in enumerate(self.split.roots[rank])]

    @property
    def local_count(self) -> int:
        return len(self.owned)

    def slot(self, j: int):
        return self.slots[j]

    @property
    def grad(self):
        """The mean gradient, once reduced."""
        return self.slots[0] if self.top is None else self.top[0]

    def _tree_chunk(self, rows, pairs, c: int, scale: float) -> float:
        """Chunk c of rows: the pairs' additions into row 0, then x scale; its sum of squares."""
        start, end = self.chunks[c]
        if start == end:
            return 0.0
        return self.be.reduce_slots(rows, pairs, start, end, scale)

    def reduce_chunk(self, c: int) -> float:
        """One process: tree-sum chunk c of the slots into slot 0, scaled by 1/M; its sum of squares."""
        return self._tree_chunk(self.slots, self.pairs, c, 1.0 / self.M)

    def reduce(self, map_chunks=None) -> float:
        """Sum the tree (and across ranks); returns the gradient norm. map_chunks(n, work) runs
        work(sphere, chunk) for every chunk (the spheres' map); default: this thread."""
        if map_chunks is None:
            map_chunks = lambda n, work: [work(0, c) for c in range(n)]  # noqa: E731
        n = len(self.chunks)
        if self.top is None:
            return norm_of(map_chunks(n, lambda i, c: self.reduce_chunk(c)))
        if len(self.pairs):  # phase A: this rank's subtrees (x 1.0 is exact)
            map_chunks(n, lambda i, c: self._tree_chunk(self.slots, self.pairs, c, 1.0))
        for row, j in self._pack:
            self.top[row] = self.slots[j]
        self.comm.allgather_rows(self.top)
        top = lambda i, c: self._tree_chunk(self.top, self.top_pairs, c, 1.0 / self.M)  # noqa: E731
        return norm_of(map_chunks(n, top))  # phase B: the rest of the tree

    def reduce_losses(self, losses: list[float]) -> float:
        """Mean micro-batch loss of the whole step, summed over the same tree."""
        return tree_mean(self.comm.gather(losses, self.M))


def _pair_array(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def norm_of(partial_sums: list[float]) -> float:
    """sqrt of per-chunk sums of squares added in chunk order."""
    total = 0.0
    for p in partial_sums:
        total += p
    return math.sqrt(total)
