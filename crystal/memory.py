"""What one rank of a run holds in memory, by part: what `crystal train --dry-run` prints.

Above the model and the reducer: the parameters and activations are the model's, the gradient
buffers are the reducer's pool and exchange, the AdamW moments are the optimizer's (of a rank's
span under the sharded optimizer).
"""

from __future__ import annotations

import os

from crystal.config import ModelConfig
from crystal.errors import CrystalError
from crystal.model import ParamLayout
from crystal.model import activation_bytes as gpt2_activation_bytes
from crystal.model import flops_per_token as gpt2_flops_per_token
from crystal.reducer import gradient_floats, shard_spans


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (the PaLM convention: 6 per parameter of a product, attention over
    full T x T). gpt2: crystal.model.flops_per_token. llama: 6 x (parameters - the token
    embedding, which is a lookup, unless it is also the tied head) + 12 n_layer T n_head head_dim
    (the scores and the weighted sum of each query head; GQA shares K and V, not these products)."""
    if not cfg.llama:
        return gpt2_flops_per_token(cfg, seq_len)
    lookup = 0 if cfg.tied else cfg.vocab_size * cfg.n_embd
    return 6 * (ParamLayout(cfg).n_params - lookup) + 12 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_size


def activation_bytes(cfg: ModelConfig, B: int, T: int, precision: str = "fp32", flash: bool = False) -> int:
    """Bytes of one sphere's activations for [B, T] batches (crystal.model.activation_bytes for
    gpt2). llama, per token and layer: the normed input, q|k|v (rotated in place), the attention
    output and projection, two residual sums, the second normed input, gate|up, their SwiGLU and
    the down projection, two float32 RMSNorm statistics; the saved attention as gpt2's; then the
    final norm, the logits, and the backward's scratch (one layer's gradients), plus gpt2's
    per-sphere attention scratch."""
    if not cfg.llama:
        return gpt2_activation_bytes(cfg, B, T, precision, flash)
    bf16 = precision == "bf16"
    flash = flash and bf16  # cuDNN flash attention: bf16 only
    a = 2 if bf16 else 4
    C, I, L, NH = cfg.n_embd, cfg.mlp_size, cfg.n_layer, cfg.n_head
    Q, QKV = NH * cfg.head_size, cfg.qkv_size
    att = (B * NH * T * 4) if flash else B * NH * T * T * a
    per_layer = B * T * (a * (6 * C + QKV + Q + 3 * I) + 4 * 2) + att
    final = B * T * (a * (2 * C + cfg.padded_vocab_size) + 4 * 2)  # embedded, ln_f; rstd, losses
    scratch = B * T * a * (2 * C + Q + QKV + 2 * I)
    total = L * per_layer + final + scratch
    if not bf16:
        return total + 4 * 2 * T * T
    return total + (0 if flash else 2 * B * NH * T * T)


def memory_estimate(cfg: ModelConfig, micro_batches: int, spheres: int, B: int, T: int,
                    ranks: int = 1, precision: str = "fp32", flash: bool = False, shard: bool = False) -> dict:
    """Bytes of one process's training state by part: parameters, the reducer's gradient pool
    (spheres + ceil(log2 m) + 1 buffers for its m micro-batches, at most m, plus the exchange
    when there are several ranks), AdamW moments (of its span only with ranks and `shard`), the
    bf16 weight copy (bf16 only), activations of every sphere. With ranks, the largest rank's.
    spheres: those computing at once (on the cpu the core gate's, crystal.spheres.computing_at_once)."""
    n = ParamLayout(cfg).size
    P = n * 4
    acts = activation_bytes(cfg, B, T, precision, flash)
    span = max(hi - lo for lo, hi in shard_spans(n, ranks)) if shard and ranks > 1 else n
    parts = {"params": P, "grads": 4 * gradient_floats(n, micro_batches, spheres, ranks, shard),
             "adamw_moments": 2 * 4 * span,
             "weights_bf16": 2 * n if precision == "bf16" else 0,
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
    return memory_estimate(model, train.micro_batches, at_once, train.batch_size, train.seq_len, ranks,
                           train.precision, flash, shard)


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
