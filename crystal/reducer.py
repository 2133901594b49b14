"""GradientReducer: the step's gradients summed in a fixed binary tree, in a pool of K buffers.

The tree. Micro-batch m's gradient is leaf m; `tree_pairs(M)` folds them over leaf index
(stride 1, 2, 4, ...: node i += node i+stride), an order that depends only on M, so the step
gradient is bitwise the same for any number of spheres. Each addition is elementwise, so the bits
of a node depend only on its two children's bits, never on when or by which thread it is added,
nor on how the buffer is cut: node additions can run as soon as both children exist.

The pool. A rank does not keep one buffer per micro-batch: it keeps a pool of
K = min(n, spheres + ceil(log2 n) + 1) rows (n: its micro-batches), one 2-D array [K, size]
allocated once. A sphere takes a free row for micro-batch j (`acquire`, just before the backward
writes it), and when the gradient is written (`release`) the same thread runs every tree
addition that has become ready: a node adds its next child (dst += src, the tree's own dst/src
roles and per-node order) when both exist, the src's row goes back to the pool, and it walks up
while the parent is ready too. Rows in use are micro-batches in flight (at most one per sphere)
plus finished nodes waiting for a sibling, and never more than K.

Who gets a row (flow control and why it cannot deadlock). Micro-batch 0 always gets row 0 (it is
the first item of sphere 0; node 0, the tree's spine, keeps that row, so with one rank the final
sum lands in row 0). Any other j gets a row only when the free rows outnumber the micro-batches
below j that have none yet; otherwise its sphere waits until a row is freed. Invariant: free
rows >= rows still owed to micro-batches below the highest one granted. Suppose every sphere
with work left waits. The smallest ungranted micro-batch t is some sphere's next item (a sphere
takes its items in increasing order). If a micro-batch above t has a row, the invariant leaves a
free row for t. Otherwise the granted ones are exactly [0, t), all finished (no sphere
computes), and the live nodes are the tree's decomposition of that prefix: popcount(t) <=
ceil(log2 n) of them (with ranks, the finished roots have left for the exchange buffer, so only
the nodes of one subtree of the range remain), so K >= ceil(log2 n) + 1 leaves a free row.
Either way t can proceed: no deadlock, with any timing, for any K >= ceil(log2 n) + 1. The
`spheres` rows above that minimum are what lets every sphere hold a micro-batch while the
frontier is full, so spheres of even speed rarely wait. On cuda each node carries the event
recorded after its last write, and each freed row the event after its last read: a thread adding
another sphere's buffer, or writing into a row another sphere freed, waits on that event on its
own stream.

Across R ranks the tree is the same tree. Rank r computes the micro-batches
[r M / R, (r+1) M / R) (integer division) and owns every subtree that lies inside that range:
it sums them itself (in its pool, as above), copies each finished subtree root into its rows of
the exchange buffer, all ranks' rows travel in one all-gather, and every rank then finishes the
tree's remaining additions over those roots (phase B) in the tree's order. Each addition is the
one a single process does, on the same operands, so the mean gradient is bitwise the
single-process one for any R <= M. When M / R is a power of two each rank sends exactly one root
(its whole subtree); otherwise a range's edges cut subtrees and a rank sends one root per whole
subtree it holds (M = 12 on 2 ranks: [0,4)+[4,6) and [6,8)+[8,12)); with R = M every leaf is
sent. Memory per rank: K pool rows + R x (roots per rank) exchange rows.

The final pass. With one rank, the tree's last addition (node 0 += its last child) is left for
the final pass; with ranks, phase B's additions are. That pass cuts the flat buffer into CHUNKS
fixed pieces, a number independent of the sphere count: spheres reduce chunks in parallel
through the backend's `reduce_slots` (the remaining pairs, then x 1/M; cuda fuses the last pair
into row 0 with the scale and the norm's partial sums), each returning its chunk's sum of
squares, and the root adds those partial sums in chunk order: the gradient norm, too, is the
same for any sphere count.

The sharded optimizer (ZeRO stage 1, `shard=True` with ranks). Rank r owns the chunks
rank_ranges(CHUNKS, R)[r], one contiguous span [lo, hi) of the flat buffer (`shard_spans`). A
finished root is cut into the owners' spans as it is sent (R slice copies into the send buffer,
grouped by owner), one all-to-all (Alltoallv) gives every owner every rank's roots over its span,
and the owner alone runs phase B on its chunks: the same additions on the same operands, bit for
bit. The per-chunk sums of squares are all-gathered and added in chunk order (the norm, bitwise),
the owner clips and runs AdamW on its span (its moments and finished gradient exist nowhere else),
and `gather_params` all-gathers the updated spans into every rank's parameters. Rows of the
exchange are padded to 16 floats (`_pad16`), so every chunk keeps its alignment. Memory per rank:
K pool rows + its roots (the send buffer) + R x (roots per rank) rows of its span.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from crystal.errors import CrystalError
from crystal.world import Comm, rank_ranges

CHUNKS = 48  # divides evenly among 1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 spheres
_WAIT_S = 1.0  # a waiting acquire re-checks for an abort at least this often


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


def shard_spans(size: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's [lo, hi) of a flat buffer under the sharded optimizer: the chunks
    rank_ranges(CHUNKS, ranks) gives it, joined (empty for a rank without chunks)."""
    bounds = chunk_bounds(size)
    spans = []
    for rg in rank_ranges(len(bounds), ranks):
        lo = bounds[rg.start][0]
        spans.append((lo, bounds[rg.stop - 1][1] if len(rg) else lo))
    return spans


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def pool_rows(n: int, spheres: int) -> int:
    """Gradient buffers in a rank's pool for its n micro-batches: spheres + ceil(log2 n) + 1,
    and never more than n."""
    return min(n, max(1, spheres) + (n - 1).bit_length() + 1)


def gradient_buffers(micro_batches: int, spheres: int, ranks: int = 1) -> int:
    """Flat gradient buffers a rank allocates: its pool, plus every rank's roots (the exchange
    buffer) when there are several ranks. With ranks, the largest rank's."""
    split = split_tree(micro_batches, ranks)
    rows = pool_rows(max(len(r) for r in split.ranges), spheres)
    return rows + (ranks * split.roots_per_rank if ranks > 1 else 0)


def gradient_floats(size: int, micro_batches: int, spheres: int, ranks: int = 1, shard: bool = False) -> int:
    """Floats of gradient buffers the largest rank allocates for a flat buffer of `size`: its pool,
    and with ranks the exchange: whole rows of every rank's roots, or (shard) its own roots for
    sending plus every rank's roots over its span."""
    split = split_tree(micro_batches, ranks)
    if ranks == 1 or not shard:
        return gradient_buffers(micro_batches, spheres, ranks) * size
    widths = [_pad16(hi - lo) for lo, hi in shard_spans(size, ranks)]
    k = split.roots_per_rank
    return max(pool_rows(len(rg), spheres) * size + len(split.roots[r]) * sum(widths) + ranks * k * widths[r]
               for r, rg in enumerate(split.ranges))


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


class ReducerAborted(RuntimeError):
    """A sphere waiting for a gradient buffer was woken because the step is abandoned."""


class GradientReducer:
    """This rank's gradient pool and the tree that sums it (see the module doc).

    Per step: for each local micro-batch j (0-based within `owned`), `acquire(j)` gives the pool
    row to write its gradient into and `release(j)` says it is written (`put(j, values)` does
    both from host values); then `reduce(map)` finishes the tree and returns the gradient norm,
    running the per-chunk work through `map(n_items, work)` (the spheres); `grad` is then the
    mean gradient, the same buffer contents on every rank. `high_water` is the most rows ever
    in use at once. `rows` overrides the pool size (at least ceil(log2 n) + 1; tests).

    shard (with ranks: the sharded optimizer): `reduce` finishes only this rank's chunks
    (`my_chunks`, the span `span`), `grad` is the mean gradient over that span alone, and after
    the optimizer `gather_params` gives every rank the whole updated parameters. Without it
    `my_chunks` is every chunk and `span` the whole buffer."""

    def __init__(self, be, size: int, micro_batches: int, comm=None, spheres: int = 1,
                 rows: int | None = None, shard: bool = False):
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
        n, lo = len(self.owned), self.owned.start
        least = min(n, (n - 1).bit_length() + 1)
        self.rows = pool_rows(n, spheres) if rows is None else min(n, rows)
        if self.rows < least:
            raise ValueError(f"a pool of {self.rows} rows can deadlock for {n} micro-batches "
                             f"(at least {least})")
        self.pool = be.empty((self.rows, size))  # allocated once, reused every step
        self.chunks = chunk_bounds(size)
        self.sharded = shard and ranks > 1
        self.spans = shard_spans(size, ranks) if self.sharded else [(0, size)] * ranks
        self.span = self.spans[rank]
        self.my_chunks = rank_ranges(len(self.chunks), ranks)[rank] if self.sharded else range(len(self.chunks))
        # the additions done as soon as their operands exist, in local indices: each dst's srcs
        # in tree order; the rest go to the final pass
        self._last_src = None
        if ranks > 1:
            eager = [(d - lo, s - lo) for d, s in self.split.local[rank]]
        else:
            eager = tree_pairs(n)[:-1]  # the last one (into node 0) joins the final pass
            self._last_src = tree_pairs(n)[-1][1] if n > 1 else None
        self._absorbs: list[list[int]] = [[] for _ in range(n)]
        self._parent = [-1] * n
        self._pos = [0] * n
        for d, s in eager:
            self._parent[s], self._pos[s] = d, len(self._absorbs[d])
            self._absorbs[d].append(s)
        self.top = None
        self._send: dict[int, int] = {}  # local root -> its row of the exchange (sharded: of the send buffer)
        if ranks > 1:
            # every rank's roots in a [R * k, width] buffer, rank r's at rows k r ...; the tree's
            # remaining additions are remapped onto those rows (slot 0 is row 0)
            k = self.split.roots_per_rank
            row = {i: r * k + j for r, rs in enumerate(self.split.roots) for j, i in enumerate(rs)}
            self.top_pairs = _pair_array([(row[d], row[s]) for d, s in self.split.top])
            mine = self.split.roots[rank]
            if self.sharded:
                self._plan_exchange(be, size, k, len(mine))
                self._send = {i - lo: j for j, i in enumerate(mine)}
            else:
                self.top = be.empty((ranks * k, size))
                self._send = {i - lo: rank * k + j for j, i in enumerate(mine)}
        self._cond = threading.Condition(threading.Lock())
        self._aborted = False
        self.high_water = 0
        self.waits = 0  # acquires that had to wait for a row (flow control)
        self.begin_step()

    def _plan_exchange(self, be, size: int, k: int, n: int) -> None:
        """The sharded exchange: this rank's n roots cut into owner blocks [n, width_o] (the send
        buffer), and its [R * k, width] rows of every rank's roots over its own span."""
        R, rank = self.comm.size, self.comm.rank
        widths = [_pad16(hi - lo) for lo, hi in self.spans]
        starts = [n * sum(widths[:o]) for o in range(R)]
        self._pieces = [(lo, hi, starts[o], widths[o]) for o, (lo, hi) in enumerate(self.spans)]
        self._sendbuf = be.empty(max(1, n * sum(widths)))
        w = widths[rank]
        self.top = be.empty((R * k, w))
        self._exchange = dict(
            send_counts=[n * x for x in widths], send_displs=starts,
            recv_counts=[len(self.split.roots[r]) * w for r in range(R)], recv_displs=[r * k * w for r in range(R)],
            block=k * max(widths))  # the largest block any rank sends any owner (padded transports)

    @property
    def local_count(self) -> int:
        return len(self.owned)

    def row(self, r: int):
        """Pool row r (a flat gradient buffer)."""
        return self.pool[r]

    @property
    def grad(self):
        """The mean gradient, once reduced (sharded: over `span` only, indexed from its start)."""
        if self.top is None:
            return self.pool[0]
        return self.top[0, :self.span[1] - self.span[0]] if self.sharded else self.top[0]

    # --- the step's bookkeeping (all under self._cond) ---
    def begin_step(self) -> None:
        """Forget the last step's nodes: every row free (a step's work is ordered after the
        previous step's by the spheres' rounds)."""
        n = len(self.owned)
        with self._cond:
            self._free = [(r, None) for r in range(self.rows - 1, 0, -1)]  # (row, event); 0 is leaf 0's
            self._granted = [False] * n
            self._row = [-1] * n
            self._event: list = [None] * n
            self._written = [False] * n  # leaf released
            self._absorbed = [0] * n  # srcs added into this node so far
            self._busy = [False] * n  # being added into right now
            self._complete = [False] * n  # every eager addition into it done (a finished node)
            self._in_use = 0
            self._aborted = False

    def abort(self) -> None:
        """Wake every waiting `acquire` with ReducerAborted (a sphere failed; the step is lost)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def _owed_below(self, j: int) -> int:
        return sum(1 for i in range(j) if not self._granted[i])

    def acquire(self, j: int, block: bool = True) -> int | None:
        """The pool row micro-batch j's gradient goes into; waits while the pool is short (or,
        with block=False, returns None at once)."""
        with self._cond:
            if self._granted[j]:
                raise RuntimeError(f"micro-batch {j} already has a gradient row this step")
            if j == 0:
                r, ev = 0, None
            else:
                waited = False
                while not (self._aborted or len(self._free) > self._owed_below(j)):
                    if not block:
                        return None
                    waited = True
                    self._cond.wait(_WAIT_S)
                if self._aborted:
                    raise ReducerAborted("the step was abandoned")
                self.waits += waited
                r, ev = self._free.pop()
            self._granted[j], self._row[j] = True, r
            self._in_use += 1
            self.high_water = max(self.high_water, self._in_use)
            self._cond.notify_all()  # one fewer owed below the waiting micro-batches above j
        self.be.wait_event(ev)  # the row's last reader (an addition on another stream) is done
        return r

    def release(self, j: int) -> None:
        """Micro-batch j's gradient is written (by this thread): run every addition this makes
        ready, here, before the thread takes its next micro-batch."""
        ev = self.be.record_event()
        with self._cond:
            if not self._granted[j] or self._written[j]:
                raise RuntimeError(f"micro-batch {j} released without its row, or twice")
            self._written[j], self._event[j] = True, ev
            action = self._advance(j)
        while action is not None:
            action = self._run(*action)

    def put(self, j: int, values) -> None:
        """Micro-batch j's gradient from values (host or device): acquire, copy, release."""
        r = self.acquire(j)
        self.pool[r][...] = self.be.to_device(values)
        self.release(j)

    def _advance(self, i: int):
        """Node i is idle (its leaf written, no addition into it running): the next action it
        enables, claimed under the lock, or None."""
        absorbs = self._absorbs[i]
        if self._absorbed[i] < len(absorbs):
            s = absorbs[self._absorbed[i]]
            if self._complete[s]:  # both children exist: add now
                self._busy[i] = True
                return ("add", i, s)
            return None  # s's completion will add it
        self._complete[i] = True
        p = self._parent[i]
        if p >= 0:
            if (self._written[p] and not self._busy[p] and not self._complete[p]
                    and self._absorbed[p] == self._pos[i]):
                self._busy[p] = True
                return ("add", p, i)
            return None  # p is not at i yet: p's own progress will add i
        if i in self._send:
            return ("send", i, None)
        return None  # an operand of the final pass

    def _run(self, what: str, d: int, s: int | None):
        """One claimed action on this thread (outside the lock); returns the next one."""
        be, pool = self.be, self.pool
        if what == "add":
            be.wait_event(self._event[d])
            be.wait_event(self._event[s])
            be.add_inplace(pool[self._row[d]], pool[self._row[s]])
            ev = be.record_event()
            with self._cond:
                self._free_row(s, ev)
                self._event[d] = ev
                self._absorbed[d] += 1
                self._busy[d] = False
                return self._advance(d)
        be.wait_event(self._event[d])  # "send": a finished root of this rank to the exchange rows
        if self.sharded:  # cut into the owners' spans: root j's piece for owner o at block o, row j
            src, j = pool[self._row[d]], self._send[d]
            for lo, hi, start, width in self._pieces:
                if hi > lo:
                    self._sendbuf[start + j * width:start + j * width + hi - lo] = src[lo:hi]
        else:
            self.top[self._send[d]] = pool[self._row[d]]
        ev = be.record_event()
        with self._cond:
            self._free_row(d, ev)
        return None

    def _free_row(self, i: int, event) -> None:
        self._free.append((self._row[i], event))
        self._row[i] = -1
        self._in_use -= 1
        self._cond.notify_all()

    # --- the final pass ---
    def _final_pairs(self) -> np.ndarray:
        """One rank: the tree's last addition as pool rows (node 0 is row 0), or none (M = 1)."""
        if not all(self._written):
            raise RuntimeError("reduce before every micro-batch's gradient was released")
        if self._last_src is None:
            return _pair_array([])
        return _pair_array([(0, self._row[self._last_src])])

    def _tree_chunk(self, rows, pairs, c: int, scale: float) -> float:
        """Chunk c of rows: the pairs' additions into row 0, then x scale; its sum of squares.
        Rows that hold a span (sharded) are indexed from the span's start."""
        start, end = self.chunks[c]
        if start == end:
            return 0.0
        lo = self.span[0] if rows is self.top and self.sharded else 0
        return self.be.reduce_slots(rows, pairs, start - lo, end - lo, scale)

    def reduce_chunk(self, c: int) -> float:
        """One process: the last addition on chunk c into row 0, scaled by 1/M; its sum of squares."""
        return self._tree_chunk(self.pool, self._final_pairs(), c, 1.0 / self.M)

    def reduce(self, map_chunks=None) -> float:
        """Finish the tree (and across ranks); returns the gradient norm. map_chunks(n, work)
        runs work(sphere, chunk) for every chunk (the spheres' map); default: this thread."""
        if map_chunks is None:
            map_chunks = lambda n, work: [work(0, c) for c in range(n)]  # noqa: E731
        n = len(self.chunks)
        if self.top is None:
            pairs = self._final_pairs()
            norm = norm_of(map_chunks(n, lambda i, c: self._tree_chunk(self.pool, pairs, c, 1.0 / self.M)))
        elif self.sharded:
            if not all(self._written):
                raise RuntimeError("reduce before every micro-batch's gradient was released")
            x = self._exchange
            self.comm.alltoallv(self._sendbuf, x["send_counts"], x["send_displs"], self.top.reshape(-1),
                                x["recv_counts"], x["recv_displs"], x["block"])
            mine = self.my_chunks  # phase B on this rank's chunks; every chunk's sum of squares, in order
            top = lambda i, c: self._tree_chunk(self.top, self.top_pairs, mine[c], 1.0 / self.M)  # noqa: E731
            norm = norm_of(self.comm.gather(map_chunks(len(mine), top), n, "the gradient norm"))
        else:
            if not all(self._written):
                raise RuntimeError("reduce before every micro-batch's gradient was released")
            self.comm.allgather_rows(self.top)
            top = lambda i, c: self._tree_chunk(self.top, self.top_pairs, c, 1.0 / self.M)  # noqa: E731
            norm = norm_of(map_chunks(n, top))  # phase B: the rest of the tree
        self.begin_step()
        return norm

    def gather_params(self, params) -> None:
        """Sharded: every rank's updated span into every rank's parameters (in place)."""
        if self.sharded:
            self.comm.allgatherv(params, [hi - lo for lo, hi in self.spans], [lo for lo, _ in self.spans],
                                 "the parameter all-gather")

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
