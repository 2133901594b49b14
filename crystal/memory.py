"""What one rank of a run holds in memory, by part: what `crystal train --dry-run` prints.

Above the model and the reducer: the parameters and activations are the model's, the gradient
buffers are the reducer's pool and exchange, the AdamW moments are the optimizer's (of a rank's
span under the sharded optimizer).
"""

from __future__ import annotations

import os

from crystal.config import ModelConfig
from crystal.errors import CrystalError
from crystal.model import ParamLayout, activation_bytes
from crystal.reducer import gradient_floats, shard_spans


def memory_estimate(cfg: ModelConfig, micro_batches: int, spheres: int, B: int, T: int,
                    ranks: int = 1, precision: str = "fp32", flash: bool = False, shard: bool = False,
                    lora=None) -> dict:
    """Bytes of one process's training state by part: parameters, the reducer's gradient pool
    (spheres + ceil(log2 m) + 1 buffers for its m micro-batches, at most m, plus the exchange
    when there are several ranks), AdamW moments (of its span only with ranks and `shard`), the
    bf16 weight copy (bf16 only), activations of every sphere. With ranks, the largest rank's.
    spheres: those computing at once (on the cpu the core gate's, crystal.spheres.computing_at_once).
    lora (a crystal.lora.LoraConfig): the adapters train: the gradient buffers and the moments are
    theirs, params counts the frozen base (in bf16 alone under bf16) and the adapters."""
    n = ParamLayout(cfg).size
    acts = activation_bytes(cfg, B, T, precision, flash)
    trained = n
    if lora is not None:
        from crystal.lora import AdapterLayout, lora_activation_bytes

        trained = AdapterLayout(cfg, lora).size
        acts += lora_activation_bytes(cfg, lora, B, T, 2 if precision == "bf16" else 4)
    P = (2 * n if precision == "bf16" else 4 * n) + 4 * trained if lora is not None else 4 * n
    span = max(hi - lo for lo, hi in shard_spans(trained, ranks)) if shard and ranks > 1 else trained
    parts = {"params": P, "grads": 4 * gradient_floats(trained, micro_batches, spheres, ranks, shard),
             "adamw_moments": 2 * 4 * span,
             "weights_bf16": 2 * trained if precision == "bf16" else 0,
             "activations_per_sphere": acts, "activations": spheres * acts}
    parts["total"] = (parts["params"] + parts["grads"] + parts["adamw_moments"] + parts["weights_bf16"]
                      + parts["activations"])
    return parts


def run_estimate(model: ModelConfig, train, ranks: int = 1, flash: bool = False, shard: bool | None = None) -> dict:
    """memory_estimate of a resolved run (TrainConfig `train`): on the cpu the spheres computing
    at once under the core gate; shard: the sharded optimizer (None: as the run would)."""
    from crystal.spheres import computing_at_once

    at_once = computing_at_once(train.spheres, train.cores, train.device)
    if shard is None:
        shard = ranks > 1 and train.shard_optimizer is not False
    from crystal.lora import LoraConfig

    parts = memory_estimate(model, train.micro_batches, at_once, train.batch_size, train.seq_len, ranks,
                            train.precision, flash, shard, LoraConfig.of(train, model))
    if train.optimizer == "muon":  # AdamW's moments of its own tensors, Muon's momentum (crystal.muon)
        from crystal.muon import optimizer_memory

        state = optimizer_memory(ParamLayout(model), "muon", ranks, shard)
        parts["total"] += sum(state.values()) - parts["adamw_moments"]
        parts.update(state)
    return parts


def available_bytes(device: str) -> int | None:
    """Memory a run may still take: the GPU's free memory on cuda, else the machine's
    MemAvailable (Linux), else free physical pages; None when it cannot be told."""
    if device == "cuda":
        try:
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0])
        except Exception:  # no driver or no cupy: the backend reports that itself
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(estimate: int, available: int | None, where: str) -> None:
    """The memory guard: a run whose --dry-run estimate exceeds the memory available stops
    before it allocates anything large."""
    if available is not None and estimate > available:
        raise CrystalError(f"this run needs about {estimate / 2**30:,.1f} GiB (the --dry-run estimate) but "
                           f"{available / 2**30:,.1f} GiB of {where} memory is available; make the model, batch or "
                           "sphere count smaller, or pass --no-memory-check to try anyway")
