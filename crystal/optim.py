"""AdamW over the flat parameter buffer, its learning-rate schedule, gradient clipping."""

from __future__ import annotations

import math

import numpy as np

from crystal.backends.base import AdamWScalars
from crystal.config import TrainConfig
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
    optimizer): m and v hold [lo, hi) only, and so do the gradients update_chunk is given; only
    chunks inside the span may be updated. ranges: the [K,3] rows (start, end, decay) it updates
    (default: the whole buffer, layout.decay_ranges(); crystal.muon gives it the rest of Muon's)."""

    def __init__(self, be, layout: ParamLayout, cfg: TrainConfig, chunks: list[tuple[int, int]] | None = None,
                 span: tuple[int, int] | None = None, ranges: np.ndarray | None = None):
        self.be, self.cfg = be, cfg
        self.lo, self.hi = span if span is not None else (0, layout.size)
        self.whole = (self.lo, self.hi) == (0, layout.size)
        self.m = be.zeros(self.hi - self.lo)
        self.v = be.zeros(self.hi - self.lo)
        ranges = layout.decay_ranges() if ranges is None else ranges
        shift = np.array([self.lo, self.lo, 0], dtype=np.int64)  # rows indexed from the span's start
        self.chunk_ranges = [clip_ranges(ranges, max(s, self.lo), min(e, self.hi)) - shift
                             for s, e in (chunks or [(0, layout.size)])]
        # each chunk's rows as runs that cover an interval contiguously (the backend op's
        # contract): one per chunk over the whole buffer, more where Muon's matrices leave gaps
        self.chunk_runs = [contiguous_runs(r) for r in self.chunk_ranges]
        self.t = 0
        self.scalars: AdamWScalars | None = None  # the current step's, from begin_step

    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.t += 1
        k = self.cfg
        self.scalars = AdamWScalars.of(lr, k.beta1, k.beta2, k.eps, k.weight_decay, self.t, grad_scale)

    def update_chunk(self, c: int, params, grads, compute=None) -> None:
        """AdamW on chunk c; compute (a bf16 copy of params the spheres read) is refreshed with it.
        params and compute are whole buffers, grads the span's."""
        runs = self.chunk_runs[c]
        if not runs:
            return
        compute = None if compute is params else compute
        if not self.whole:
            params = params[self.lo:self.hi]
            compute = None if compute is None else compute[self.lo:self.hi]
        for ranges in runs:
            self.be.adamw_update(params, grads, self.m, self.v, ranges, self.scalars, compute)

    def step(self, params, grads, lr: float, grad_scale: float = 1.0) -> None:
        self.begin_step(lr, grad_scale)
        for c in range(len(self.chunk_ranges)):
            self.update_chunk(c, params, grads)


def contiguous_runs(ranges) -> list:
    """[K,3] rows in order, split where a row does not start at the previous one's end."""
    cuts = [i for i in range(1, ranges.shape[0]) if ranges[i, 0] != ranges[i - 1, 1]]
    return [r for r in np.split(ranges, cuts) if r.shape[0]]


def clip_ranges(ranges, start: int, end: int):
    """The (start, end, decay) rows of `ranges` cut to [start, end)."""
    rows = [(max(s, start), min(e, end), d) for s, e, d in ranges.tolist() if s < end and e > start]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)
