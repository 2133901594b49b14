"""CUDA graphs: a training step replayed as N + 1 graph launches (`--cuda-graphs`).

Each sphere captures, once, its share of a step: forward and backward of a contiguous block of
micro-batches and the tree additions inside that block; the root captures the rest: the tree's
additions across blocks, the 1/M scale and the norm's per-chunk sums, the clipping factor,
AdamW and the bf16 weight copy. A step is then: each sphere stages its micro-batches (one copy)
and launches its graph on its own stream, concurrently; the root writes the step's AdamW scalars
(one copy), launches its graph after every sphere's, and reads the losses and the norm back
(one copy). Python issues N + 1 graph launches a step, whatever the model's size.

Same bits as eager steps. Eager steps hand micro-batches out round-robin and take gradient rows
from the reducer's pool as they come; a graph needs every pointer fixed, so `graph_plan` fixes
both: sphere s takes the contiguous block `rank_ranges(n, N)[s]` (the reducer's own split across
ranks, applied to spheres), and rows are assigned by running the block's leaves in order. The
additions are the fixed tree's own (`split_tree`), each elementwise on the same operands, so
the gradient, the norm and every parameter are bitwise those of an eager step, and of any sphere
count. What changes from step to step is read from device memory written before each replay
(crystal.backends.cuda: `stage`, the AdamW scalars); the loss sums and the norm go to a device
buffer; a non-finite loss or norm sets AdamW's skip flag on the device (`step_scalars`), so the
update is skipped there as the trainer skips it in an eager step.

The first step of a process is eager (every buffer and plan allocated, every kernel compiled);
the graphs are captured at the second, on the threads that replay them (their scratch buffers
and cuBLASLt handles are per thread). A capture that fails raises GraphCaptureError before any
graph of that step ran, so the trainer can run the step eagerly instead (`--cuda-graphs auto`).
One process only: the exchange between ranks goes through the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from crystal.reducer import split_tree


@dataclass(frozen=True)
class GraphPlan:
    """Which sphere computes which micro-batch, into which gradient row, and the additions."""

    blocks: list[range]  # sphere s computes micro-batches blocks[s], in order
    row: list[int]  # the gradient row of micro-batch j's leaf (micro-batch 0: row 0)
    adds: list[list[tuple[int, int]]]  # after leaf j, on its sphere: (dst row, src row) additions
    final: np.ndarray  # [K,2] the additions across blocks (dst row, src row), tree order: the root's
    rows: int  # gradient rows used (each sphere its own; never more than the micro-batches)


def graph_plan(n: int, spheres: int) -> GraphPlan:
    """The static schedule of n micro-batches on `spheres` spheres (see the module doc)."""
    split = split_tree(n, spheres)
    row, adds = [-1] * n, [[] for _ in range(n)]
    first_row = 0
    for block, local in zip(split.ranges, split.local):
        free, used, node_row = [], 0, {}
        done = [False] * len(local)
        for j in block:
            if free:
                r = free.pop(0)
            else:
                r, used = first_row + used, used + 1
            row[j] = node_row[j] = r
            progress = True
            while progress:  # every addition whose operands are complete, in tree order
                progress = False
                for p, (d, s) in enumerate(local):
                    end = min(d + 2 * (s - d), n)
                    earlier = all(done[q] for q, (d2, _) in enumerate(local[:p]) if d2 in (d, s))
                    if not done[p] and end <= j + 1 and earlier:
                        adds[j].append((node_row[d], node_row[s]))
                        free.append(node_row.pop(s))
                        free.sort()
                        done[p] = progress = True
        first_row += used
    # a node keeps its leaf's row (additions go into dst)
    final = np.array([(row[d], row[s]) for d, s in split.top], np.int64).reshape(-1, 2)
    return GraphPlan(split.ranges, row, adds, final, first_row)


class StepGraphs:
    """The captured step of one run: a graph per sphere with micro-batches, and the root's."""

    def __init__(self, spheres, optimizer, params, layout, grad_clip: float):
        from crystal.backends.kernels import ADAMW_SCALARS

        be, reducer = spheres.be, spheres.reducer
        if reducer.top is not None:
            raise ValueError("graph steps run in a single process")
        self.spheres, self.be, self.optimizer, self.params = spheres, be, optimizer, params
        self.n = reducer.local_count
        self.plan = graph_plan(self.n, spheres.n)
        if self.plan.rows > reducer.rows:
            raise ValueError(f"the plan needs {self.plan.rows} gradient rows, the pool has {reducer.rows}")
        self.grad_clip = grad_clip
        self.ranges = layout.decay_ranges()  # the whole buffer: one AdamW launch
        self.out = be.zeros((self.n + 1,), "float64")  # the micro-batches' loss sums, then the norm
        self.chunk_sums = be.zeros((len(reducer.chunks),), "float64")  # an empty chunk's stays 0
        self.scalars = be.zeros((ADAMW_SCALARS,), "float32")
        self._graphs: list = [None] * spheres.n
        self._root = None
        self.launches = 0  # graph launches issued
        self.steps = 0

    # --- a sphere's share ---
    def _stage(self, i: int, batches, drops):
        block, cfg = self.plan.blocks[i], self.spheres.cfg
        keys = [drops[j].keys(cfg.n_layer) for j in block] if drops else None
        return self.be.stage([batches[j] for j in block], cfg.vocab_size, keys)

    def _sphere_body(self, i: int, staged, drops) -> None:
        from crystal.model import backward, forward

        sp, be, cfg = self.spheres, self.be, self.spheres.cfg
        pool, acts = sp.reducer.pool, sp._acts[i]
        for (idx, tgt), j in zip(staged, self.plan.blocks[i]):
            drop = drops[j] if drops else None
            forward(be, cfg, sp.weights, acts, idx, tgt, drop, grad=True, loss_out=self.out[j:j + 1])
            backward(be, cfg, sp.weights, sp.row_grads[self.plan.row[j]], acts, idx, tgt, drop)
            for d, s in self.plan.adds[j]:
                be.add_inplace(pool[d], pool[s])

    def _capture_sphere(self, i: int, batches, drops):
        """On sphere i's thread: stage and capture its graph; the error, if the capture failed."""
        if not self.plan.blocks[i]:
            return None
        staged = self._stage(i, batches, drops)
        try:
            self._graphs[i] = self._capture(lambda: self._sphere_body(i, staged, drops))
        except Exception as e:  # reported to the root, which decides (the sphere system goes on)
            return e
        return None

    def _launch_sphere(self, i: int, batches, drops, staged_already: bool) -> None:
        if not self.plan.blocks[i]:
            return
        if not staged_already:
            self._stage(i, batches, drops)
        self.be.launch_graph(self._graphs[i])

    # --- the root's share ---
    def _root_body(self) -> None:
        be, reducer, opt = self.be, self.spheres.reducer, self.optimizer
        for c, (start, end) in enumerate(reducer.chunks):
            if start < end:
                be.reduce_slots(reducer.pool, self.plan.final, start, end, 1.0 / reducer.M,
                                out=self.chunk_sums[c:c + 1])
        be.step_scalars(self.out[self.n:], self.scalars, self.chunk_sums, self.out[:self.n], self.grad_clip)
        be.adamw_update(self.params, reducer.grad, opt.m, opt.v, self.ranges, self.scalars,
                        self.spheres.weights.flat)

    def _capture(self, body):
        be = self.be
        be.begin_capture()
        try:
            body()
        except BaseException:
            with contextlib.suppress(Exception):
                be.end_capture()
            raise
        return be.end_capture()

    # --- a step ---
    def step(self, batches, drops, scalars) -> tuple[list[float], float]:
        """One training step from the graphs: the micro-batches' losses and the gradient norm.
        scalars: the step's AdamWScalars (the device fills in the clipping factor and the skip
        flag). The first call captures; a failed capture raises GraphCaptureError before any of
        this step's work ran."""
        from crystal.backends.cuda import ROOT_STREAM
        from crystal.errors import GraphCaptureError

        be, sp = self.be, self.spheres
        entry = be.record_event()  # the default stream's work so far (an eager step, evaluation)
        with be.sphere_context(ROOT_STREAM):  # a capture needs a stream of its own
            be.wait_event(entry)
            first = self._root is None
            if first:
                be.reserve_flat_ops(self.ranges)
                errors = [e for e in sp.map(sp.n, lambda i, _: self._capture_sphere(i, batches, drops))
                          if e is not None]
                if not errors:
                    try:
                        self._root = self._capture(self._root_body)
                    except Exception as e:
                        errors.append(e)
                if errors:
                    e = errors[0]
                    raise GraphCaptureError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
            sp.map(sp.n, lambda i, _: self._launch_sphere(i, batches, drops, first))
            be.upload(self.scalars, scalars.packed())
            be.launch_graph(self._root)
            out = np.asarray(be.to_host(self.out), dtype=np.float64)  # the step's one read back
            done = be.record_event()
        be.wait_event(done)
        self.launches += sum(1 for b in self.plan.blocks if b) + 1
        self.steps += 1
        B, T = batches[0][0].shape
        losses = [float(v) / (B * T) for v in out[:self.n]]  # as forward's sum / (B T)
        for s, block in enumerate(self.plan.blocks):
            st = sp.stats[s]
            for j in block:
                st.batches += 1
                st.loss_sum += losses[j]
                st.tokens += B * T
        return losses, float(out[self.n])
