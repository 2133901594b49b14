"""AdamW over the flat parameter buffer, its learning-rate schedule, gradient clipping."""

from __future__ import annotations

import math

import numpy as np

from crystal.backends.base import AdamWScalars
from crystal.config import TrainConfig
from crystal.errors import CrystalError
from crystal.model import ParamLayout


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup to lr over `warmup` steps, then cosine
    decay from lr to final_lr (lr/10 unless --min-lr) at the last step; or, under
    --lr-schedule linear-cooldown, modded-nanogpt's schedule: lr until the last cooldown_frac of
    the steps, then linear towards final_lr, w = min((1 - step/steps) / cooldown_frac, 1),
    lr_t = w lr + (1 - w) final_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "linear-cooldown":
        w = min((1.0 - step / cfg.steps) / cfg.cooldown, 1.0)
        return w * cfg.lr + (1.0 - w) * cfg.final_lr
    span = cfg.steps - cfg.warmup
    if span <= 1:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / (span - 1))
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum for 0-based `step`, warmed up as modded-nanogpt does: frac =
    min(step / warmup, 1), momentum_t = (1 - frac) start + frac momentum (warmup 0: momentum)."""
    warm = cfg.muon("momentum_warmup")
    frac = min(step / warm, 1.0) if warm > 0 else 1.0
    return (1.0 - frac) * cfg.muon("momentum_start") + frac * cfg.muon("momentum")


def clip_scale(grad_norm: float, max_norm: float) -> float:
    """Factor that brings the global gradient norm down to max_norm (1 when under it or off)."""
    if max_norm > 0 and grad_norm > max_norm:
        return max_norm / (grad_norm + 1e-6)
    return 1.0


class AdamW:
    """AdamW as in PyTorch (decoupled decay), weight decay on 2-D tensors only.

    The update is elementwise, so it can run on any partition of the buffer: `begin_step` makes
    the step's scalars once, then `update_chunk` updates one of the reducer's chunks (spheres
    share a step's chunks); `step` does all.

    span (lo, hi): the part of the buffer this optimizer updates (a rank's shard under the sharded
    optimizer); the gradients update_chunk is given are the span's; only chunks inside the span
    may be updated. ranges: the [K,3] rows (start, end, decay) it updates (default: the whole
    buffer, layout.decay_ranges(); crystal.muon gives it the rest of Muon's).

    State: m and v hold the elements of `ranges` inside the span and nothing else, packed in
    buffer order (`packing`: a buffer position's index there). AdamW alone covers the whole
    buffer, so m and v are the span itself, element for element; beside Muon they skip Muon's
    matrices. The whole run's state is every rank's packed span joined in rank order."""

    def __init__(self, be, layout: ParamLayout, cfg: TrainConfig, chunks: list[tuple[int, int]] | None = None,
                 span: tuple[int, int] | None = None, ranges: np.ndarray | None = None):
        self.be, self.cfg = be, cfg
        self.lo, self.hi = span if span is not None else (0, layout.size)
        self.whole = (self.lo, self.hi) == (0, layout.size)
        ranges = layout.decay_ranges() if ranges is None else ranges
        self.packing = Packing(ranges)
        self.at = self.packing.at(self.lo)  # the span's first element in the whole run's packed state
        self.m = be.zeros(self.packing.at(self.hi) - self.at)
        self.v = be.zeros(self.packing.at(self.hi) - self.at)
        # each chunk's rows as runs that cover an interval [a, b) contiguously (the backend op's
        # contract): one per chunk over the whole buffer, more where Muon's matrices leave gaps;
        # a run is (a, b, its packed start in m and v, its rows shifted to start at 0)
        self.chunk_runs = []
        for s, e in chunks or [(0, layout.size)]:
            runs = contiguous_runs(clip_ranges(ranges, max(s, self.lo), min(e, self.hi)))
            self.chunk_runs.append([(int(r[0, 0]), int(r[-1, 1]), self.packing.at(int(r[0, 0])) - self.at,
                                     r - np.array([r[0, 0], r[0, 0], 0], dtype=np.int64)) for r in runs])
        self.t = 0
        self.scalars: AdamWScalars | None = None  # the current step's, from begin_step

    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.t += 1
        k = self.cfg
        self.scalars = AdamWScalars.of(lr, k.beta1, k.beta2, k.eps, k.weight_decay, self.t, grad_scale)

    def update_chunk(self, c: int, params, grads, compute=None) -> None:
        """AdamW on chunk c; compute (a bf16 copy of params the spheres read) is refreshed with it.
        params and compute are whole buffers, grads the span's."""
        compute = None if compute is params else compute
        for a, b, p, rows in self.chunk_runs[c]:
            n = b - a
            self.be.adamw_update(params[a:b], grads[a - self.lo:b - self.lo], self.m[p:p + n], self.v[p:p + n],
                                 rows, self.scalars, None if compute is None else compute[a:b])

    def step(self, params, grads, lr: float, grad_scale: float = 1.0) -> None:
        self.begin_step(lr, grad_scale)
        for c in range(len(self.chunk_runs)):
            self.update_chunk(c, params, grads)

    # --- the state: what a checkpoint holds ---
    def state_buffers(self) -> list:
        """Every buffer the optimizer keeps (its memory: crystal.memory counts the same)."""
        return [self.m, self.v]

    def load_state(self, state) -> None:
        """This span's part of a checkpoint's state (crystal.checkpoint.TrainState: m and v packed
        over the whole run; AdamW's packing is the buffer itself)."""
        if state.momentum is not None:
            raise CrystalError("the checkpoint holds Muon's momentum (a run with --optimizer muon); "
                               "this run's optimizer is adamw")
        self.m[...] = self.be.to_device(state.m[self.at:self.at + self.m.size])
        self.v[...] = self.be.to_device(state.v[self.at:self.at + self.v.size])

    def gather_state(self, reducer) -> tuple:
        """(m, v, None): the whole run's state on the host of rank 0 (None on the others)."""
        return gather_packed(self.be, reducer, self.m, self.packing), gather_packed(self.be, reducer, self.v,
                                                                                   self.packing), None


class Packing:
    """The elements of [K,3] rows (start, end, ...), in order and not overlapping, packed one
    after another: the layout of an optimizer's state over the part of the buffer it updates."""

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)[:, :2]
        self.before = np.concatenate([[0], np.cumsum(self.rows[:, 1] - self.rows[:, 0])]).astype(np.int64)
        self.size = int(self.before[-1])

    def at(self, x: int) -> int:
        """The packed index of buffer position x: how many of the rows' elements lie before it."""
        i = int(np.searchsorted(self.rows[:, 1], x, side="right"))  # rows that end at or before x
        n = int(self.before[i])
        if i < self.rows.shape[0] and self.rows[i, 0] < x:
            n += x - int(self.rows[i, 0])
        return n

    def pack(self, full: np.ndarray) -> np.ndarray:
        """The rows' elements of a whole (host) buffer, packed."""
        return np.concatenate([full[s:e] for s, e in self.rows.tolist()] or [full[:0]])


def gather_packed(be, reducer, buf, packing: Packing, blocks: list[tuple[int, int]] | None = None):
    """A packed state buffer of every rank joined in rank order into the whole run's, on the host
    of rank 0 (None on the others): rank r holds the packed elements of blocks[r] (default: the
    reducer's spans). Replicated: buf itself, on the host."""
    if not reducer.sharded:
        return be.to_host(buf)
    bounds = [(packing.at(lo), packing.at(hi)) for lo, hi in (blocks or reducer.spans)]
    out = reducer.comm.gatherv(buf, [hi - lo for lo, hi in bounds], [lo for lo, _ in bounds])
    return None if out is None else be.to_host(out)


def contiguous_runs(ranges) -> list:
    """[K,3] rows in order, split where a row does not start at the previous one's end."""
    cuts = [i for i in range(1, ranges.shape[0]) if ranges[i, 0] != ranges[i - 1, 1]]
    return [r for r in np.split(ranges, cuts) if r.shape[0]]


def clip_ranges(ranges, start: int, end: int):
    """The (start, end, decay) rows of `ranges` cut to [start, end)."""
    rows = [(max(s, start), min(e, end), d) for s, e, d in ranges.tolist() if s < end and e > start]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)
