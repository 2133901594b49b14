"""crystal (cuda backend) vs PyTorch eager on the same GPU: tokens/s and MFU, fp32 and tf32.

Usage (on a machine with an NVIDIA GPU, from the repository root):
    PYTHONPATH=. python3 bench/bench_gpu.py [--preset shakespeare-char] [--steps 30] [--json OUT]
                                            [--batch-size B --micro-batches M]

Both sides train the same GPT-2 config from the same initial parameters with the same batch
(M micro-batches of B x T tokens a step), AdamW and gradient clipping, in one process,
alternating after a warm-up. MFU is model FLOPs (6N + 12 L T C per token, N = parameters)
over the GPU's matmul peak measured here with cupy at the same precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crystal.config import resolve  # noqa: E402
from crystal.model import ParamLayout, init_params  # noqa: E402
from crystal.trainer import train  # noqa: E402


def flops_per_token(m) -> float:
    n = ParamLayout(m).size
    return 6 * n + 12 * m.n_layer * m.block_size * m.n_embd


def matmul_peak(precision: str, n: int = 8192, reps: int = 10) -> float:
    import cupy as cp

    from crystal.backends.cuda import set_matmul_precision

    set_matmul_precision(precision)
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), dtype=cp.float32)
    cp.matmul(a, b, out=c)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        cp.matmul(a, b, out=c)
    cp.cuda.Device().synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def crystal_rate(preset, overrides, steps, warmup) -> float:
    # dropout off: the PyTorch side has none
    model_cfg, cfg = resolve(preset, train_overrides={**overrides, "device": "cuda", "steps": steps, "dropout": 0.0})
    marks = []
    train(model_cfg, cfg, on_step=lambda rec, s: marks.append(time.perf_counter()))
    timed = marks[warmup:]
    return cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])


def torch_rate(preset, overrides, steps, warmup, precision) -> float:
    import torch
    import torch.nn.functional as F
    from torch_gpt2 import torch_forward

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    model_cfg, cfg = resolve(preset, train_overrides=overrides)
    layout = ParamLayout(model_cfg)
    views = layout.views(init_params(model_cfg, cfg.seed))
    p = {k: torch.tensor(v.copy(), device="cuda", requires_grad=True) for k, v in views.items()}
    groups = [{"params": [p[s.name] for s in layout.specs if s.decay], "weight_decay": cfg.weight_decay},
              {"params": [p[s.name] for s in layout.specs if not s.decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len + 1)
    batches = [torch.tensor(rng.integers(0, model_cfg.vocab_size, shape), device="cuda")
               for _ in range(cfg.micro_batches)]
    marks = []
    for _ in range(steps):
        for xy in batches:
            logits = torch_forward(p, model_cfg, xy[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
            (loss / cfg.micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
    timed = marks[warmup:]
    return cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--spheres", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch [preset's]")
    ap.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step [preset's]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy as cp

    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    model_cfg, cfg = resolve(args.preset, train_overrides={"batch_size": args.batch_size,
                                                           "micro_batches": args.micro_batches})
    fpt = flops_per_token(model_cfg)
    rows = []
    for precision in ("fp32", "tf32"):
        peak = matmul_peak(precision)
        ov = {"spheres": args.spheres, "precision": precision, "batch_size": args.batch_size,
              "micro_batches": args.micro_batches}
        c_rates, t_rates = [], []
        for _ in range(args.rounds):
            c_rates.append(crystal_rate(args.preset, ov, args.steps, args.warmup_steps))
            t_rates.append(torch_rate(args.preset, ov, args.steps, args.warmup_steps, precision))
        c, t = max(c_rates), max(t_rates)
        rows.append({"precision": precision, "crystal_tokens_per_s": round(c), "torch_tokens_per_s": round(t),
                     "ratio": round(c / t, 3), "crystal_mfu": round(c * fpt / peak, 4),
                     "torch_mfu": round(t * fpt / peak, 4), "matmul_peak_tflops": round(peak / 1e12, 1)})
        print(json.dumps(rows[-1]))
    out = {"device": device, "preset": args.preset, "spheres": args.spheres, "steps": args.steps,
           "batch_size": cfg.batch_size, "micro_batches": cfg.micro_batches,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
