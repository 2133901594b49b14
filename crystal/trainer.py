"""The training loop: tokens -> batches -> spheres -> reducer -> optimizer -> checkpoint.

`train()` is what `crystal train` runs and what tests call directly. It owns nothing global:
the backend, the parameters, the sphere threads and the run directory all belong to one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from crystal.backends import get_backend
from crystal.checkpoint import RunDir
from crystal.config import ModelConfig, TrainConfig
from crystal.data import BatchIterator, load_tokens
from crystal.model import ParamLayout, init_params
from crystal.optim import AdamW, clip_scale, lr_at
from crystal.reducer import GradientReducer
from crystal.spheres import SphereSystem


@dataclass
class StepRecord:
    step: int  # 1-based: the number of optimizer steps taken
    loss: float  # mean over the step's micro-batches
    lr: float
    grad_norm: float  # global norm of the mean gradient, before clipping
    tokens_per_s: float
    ms_per_step: float
    elapsed: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: ModelConfig
    train: TrainConfig  # resolved: steps filled in from --epochs when given
    params: np.ndarray  # final flat float32 parameters (host)
    losses: list[float]
    spheres: list[dict]
    root: dict
    data_name: str = ""
    wall_s: float = 0.0
    run_dir: str | None = None
    history: list[StepRecord] = field(default_factory=list)


def resolve_steps(cfg: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """--epochs E overrides --steps: steps = E * batches per epoch / micro-batches (at least 1)."""
    if cfg.epochs is None:
        return cfg
    steps = max(1, int(cfg.epochs * batches_per_epoch / cfg.micro_batches))
    return dataclasses.replace(cfg, steps=steps)


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: RunDir | None = None,
          tokens: np.ndarray | None = None, data_name: str | None = None,
          on_start: Callable[[dict], None] | None = None,
          on_step: Callable[[StepRecord, SphereSystem], None] | None = None) -> TrainResult:
    """Train from scratch. `tokens` overrides cfg.data (tests pass arrays directly)."""
    if tokens is None:
        tokens, data_name = load_tokens(cfg.data)
    batches = BatchIterator(tokens, cfg.batch_size, cfg.seq_len, cfg.seed, model_cfg.vocab_size)
    cfg = resolve_steps(cfg, batches.batches_per_epoch)
    be = get_backend(cfg.device, cfg.precision)
    be.warmup()  # every kernel compiled before a sphere starts

    layout = ParamLayout(model_cfg)
    params = be.to_device(init_params(model_cfg, cfg.seed))
    optimizer = AdamW(be, layout, cfg)
    reducer = GradientReducer(be, layout.size, cfg.micro_batches)
    if run_dir is not None:
        run_dir.write_configs(model_cfg, cfg)
    if on_start is not None:
        on_start({"params": layout.size, "tokens": len(tokens), "data": data_name,
                  "steps": cfg.steps, "device": be.name, "config": cfg, "model": model_cfg})

    losses: list[float] = []
    history: list[StepRecord] = []
    norm_sum = 0.0
    last_norm = float("nan")
    t_start = time.perf_counter()
    with _blas_limits(be), SphereSystem(be, model_cfg, layout, params, reducer, cfg.spheres,
                                        cfg.batch_size, cfg.seq_len) as spheres:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            micro = [batches.next_batch() for _ in range(cfg.micro_batches)]
            loss = reducer.reduce_losses(spheres.step(micro))
            grad = reducer.reduce()
            norm = math.sqrt(be.sum_squares(grad))
            lr = lr_at(step, cfg)
            optimizer.step(params, grad, lr, clip_scale(norm, cfg.grad_clip))
            dt = time.perf_counter() - t0
            losses.append(loss)
            norm_sum += norm
            last_norm = norm
            rec = StepRecord(step + 1, loss, lr, norm, cfg.tokens_per_step / dt, dt * 1e3,
                             time.perf_counter() - t_start)
            history.append(rec)
            if run_dir is not None:
                run_dir.log(rec.to_json())
            if on_step is not None:
                on_step(rec, spheres)
        sphere_summary = spheres.summary()
        active = spheres.active_spheres()
    wall = time.perf_counter() - t_start
    host_params = np.array(be.to_host(params), dtype=np.float32)
    root = {
        "spheres": cfg.spheres,
        "active_spheres": active,
        "steps": cfg.steps,
        "grad_norm": last_norm,
        "mean_grad_norm": norm_sum / max(1, cfg.steps),
        "wall_s": wall,
        "tokens_per_s": cfg.tokens_per_step * cfg.steps / wall,
        "ms_per_step": 1e3 * wall / cfg.steps,
    }
    if run_dir is not None:
        run_dir.write_spheres({"root": root, "spheres": sphere_summary})
        run_dir.write_model(layout, host_params)
        run_dir.close()
    return TrainResult(model_cfg, cfg, host_params, losses, sphere_summary, root,
                       data_name or "", wall, str(run_dir.path) if run_dir else None, history)


def _blas_limits(be):
    """CPU: one BLAS thread per caller for the run (spheres are the parallelism)."""
    if be.name == "cpu":
        from crystal.backends.cpu import blas_single_thread

        return blas_single_thread()
    return contextlib.nullcontext()
