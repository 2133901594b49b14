"""What one rank of a run holds in memory, by part: what `crystal train --dry-run` prints.

Above the model and the reducer: the parameters and activations are the model's, the gradient
buffers are the reducer's pool and exchange, the AdamW moments are the optimizer's (of a rank's
span under the sharded optimizer).
"""

from __future__ import annotations

from crystal.config import ModelConfig
from crystal.model import ParamLayout, activation_bytes
from crystal.reducer import gradient_floats, shard_spans


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
