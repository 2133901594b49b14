"""crystal (cpu backend) vs PyTorch CPU eager: tokens/s, model FLOP/s, peak RSS, side by side.

Usage (from the repository root, with the test extra installed):
    python bench/bench_cpu.py --preset small [--spheres 2] [--threads 2] [--steps 30]
                              [--crystal-batch 2] [--json OUT]

Both sides train the same GPT-2 config from the same initial parameters on the same batches
(the step's M x B sequences of T tokens from crystal's BatchIterator over Tiny Shakespeare),
with AdamW, the same schedule and gradient clipping, in float32, with the same total number of
threads: crystal runs `--spheres` sphere threads with one BLAS thread each; PyTorch runs one
process with torch.set_num_threads(--threads) and does the whole step's batch in one
forward/backward (its fastest way; attention through scaled_dot_product_attention, as
nanoGPT). `--crystal-batch B` adds a third side: crystal with the same step batch cut into
micro-batches of B sequences (M = step sequences / B): fewer, larger matmuls per sphere, the
same model, data, optimizer and step. Each measurement is a fresh subprocess (so each side's
peak RSS is its own), the two sides alternate for --rounds rounds, and the first --warmup-steps
steps of each are not timed.

Model FLOPs per token: 6 * (parameters - position embeddings) + 12 * n_layer * T * C (the PaLM
convention; the tied LM head counts once). The sgemm peak is NumPy's float32 matmul of large
matrices with the same thread count, measured by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def flops_per_token(m, seq_len: int) -> float:
    from crystal.model import ParamLayout

    return 6 * (ParamLayout(m).n_params - m.block_size * m.n_embd) + 12 * m.n_layer * seq_len * m.n_embd


def sgemm_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    with threadpool_limits(threads, user_api="blas"):
        np.matmul(a, b, out=c)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                np.matmul(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best


def crystal_split(preset: str, batch: int | None) -> dict:
    """batch_size/micro_batches overrides that keep the preset's step batch (None: the preset's)."""
    from crystal.config import resolve

    if batch is None:
        return {}
    _, cfg = resolve(preset)
    sequences = cfg.batch_size * cfg.micro_batches
    if sequences % batch:
        sys.exit(f"--crystal-batch {batch} does not divide the step's {sequences} sequences")
    return dict(batch_size=batch, micro_batches=sequences // batch)


def run_crystal(preset: str, spheres: int, steps: int, warmup: int, batch: int | None) -> dict:
    from crystal.config import resolve
    from crystal.trainer import train

    # dropout off: the PyTorch side has none; AdamW, as the PyTorch side (small's default is Muon)
    model_cfg, cfg = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps, device="cpu", optimizer="adamw",
                                                          eval_every=0, dropout=0.0, **crystal_split(preset, batch)))
    marks = []
    train(model_cfg, cfg, on_step=lambda rec, s: marks.append(time.perf_counter()))
    timed = marks[warmup:]
    return {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])}


def run_torch(preset: str, threads: int, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch_gpt2 import torch_forward

    from crystal.config import resolve
    from crystal.data import BatchIterator, load_dataset
    from crystal.model import ParamLayout, init_params
    from crystal.optim import lr_at

    torch.set_num_threads(threads)
    model_cfg, cfg = resolve(preset, train_overrides=dict(steps=steps))
    layout = ParamLayout(model_cfg)
    views = layout.views(init_params(model_cfg, cfg.seed))
    p = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in views.items()}
    groups = [{"params": [p[s.name] for s in layout.specs if s.decay], "weight_decay": cfg.weight_decay},
              {"params": [p[s.name] for s in layout.specs if not s.decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    ds = load_dataset(None, cfg.val_fraction)
    it = BatchIterator(ds.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    marks = []
    for step in range(steps):
        xs, ys = zip(*(it.next_batch() for _ in range(cfg.micro_batches)))
        x, y = torch.from_numpy(np.concatenate(xs)).long(), torch.from_numpy(np.concatenate(ys)).long()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = torch_forward(p, model_cfg, x, sdpa=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    timed = marks[warmup:]
    return {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])}


def worker(args) -> None:
    """One measurement in this process; prints a JSON line with tokens/s and peak RSS."""
    if args.side == "crystal":
        out = run_crystal(args.preset, args.spheres, args.steps, args.warmup_steps, None)
    elif args.side == "crystal-split":
        out = run_crystal(args.preset, args.spheres, args.steps, args.warmup_steps, args.crystal_batch)
    else:
        out = run_torch(args.preset, args.threads, args.steps, args.warmup_steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def measure(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--preset", args.preset, "--spheres", str(args.spheres),
           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    if args.crystal_batch is not None:
        cmd += ["--crystal-batch", str(args.crystal_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--spheres", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crystal-batch", type=int, default=None,
                    help="also run crystal with micro-batches of this many sequences (same step batch)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=("crystal", "crystal-split", "torch"), dest="side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return worker(args)
    from crystal.config import resolve

    model_cfg, cfg = resolve(args.preset)
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    peak = sgemm_peak(args.threads)
    sides = ["crystal", "torch"] + (["crystal-split"] if args.crystal_batch else [])
    runs = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else reversed(sides):
            runs[side].append(measure(side, args))
            print(f"round {r + 1} {side:>13}: {runs[side][-1]['tokens_per_s']:>9,.0f} tok/s", flush=True)
    best = {side: max(rs, key=lambda x: x["tokens_per_s"]) for side, rs in runs.items()}
    c, t = best["crystal"]["tokens_per_s"], best["torch"]["tokens_per_s"]
    out = {
        "preset": args.preset, "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "date": time.strftime("%Y-%m-%d"), "spheres": args.spheres, "threads": args.threads,
        "tokens_per_step": cfg.tokens_per_step, "sgemm_peak_gflops": round(peak / 1e9, 1),
        "crystal_tokens_per_s": round(c), "torch_tokens_per_s": round(t), "ratio": round(c / t, 3),
        "crystal_ms_per_step": round(1e3 * cfg.tokens_per_step / c, 1),
        "torch_ms_per_step": round(1e3 * cfg.tokens_per_step / t, 1),
        "crystal_gflops": round(c * fpt / 1e9, 1), "torch_gflops": round(t * fpt / 1e9, 1),
        "crystal_peak_fraction": round(c * fpt / peak, 3), "torch_peak_fraction": round(t * fpt / peak, 3),
        "crystal_peak_rss_mb": round(best["crystal"]["peak_rss_mb"]),
        "torch_peak_rss_mb": round(best["torch"]["peak_rss_mb"]),
        "all_rounds": {k: [round(x["tokens_per_s"]) for x in v] for k, v in runs.items()},
        # the machine is shared and noisy: each round's crystal/torch ratio, and the medians'
        "round_ratios": [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                         for a, b in zip(runs["crystal"], runs["torch"])],
        "median_ratio": round(median(runs["crystal"]) / median(runs["torch"]), 3),
    }
    if args.crystal_batch:
        split = crystal_split(args.preset, args.crystal_batch)
        s = best["crystal-split"]["tokens_per_s"]
        out["crystal_split"] = {
            **split, "tokens_per_s": round(s), "ratio": round(s / t, 3),
            "gflops": round(s * fpt / 1e9, 1), "peak_fraction": round(s * fpt / peak, 3),
            "peak_rss_mb": round(best["crystal-split"]["peak_rss_mb"]),
            "median_ratio": round(median(runs["crystal-split"]) / median(runs["torch"]), 3),
        }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def median(rounds: list[dict]) -> float:
    return statistics.median(x["tokens_per_s"] for x in rounds)


if __name__ == "__main__":
    main()
