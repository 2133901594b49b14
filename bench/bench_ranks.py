"""One process against R ranks under mpiexec, with and without the sharded optimizer (ZeRO-1):
tokens/s, bytes each rank sends per step, ms in communication, optimizer ms, peak memory.

Usage: python bench/bench_ranks.py [--preset small] [--ranks 1 2 4] [--spheres 1] [--steps 40]
                                   [--rounds 2] [--json OUT] [-- extra crystal train flags]

Each configuration is a `crystal train` run (cpu, --quiet, no checkpoints) in a fresh process
group: 1 rank is a plain process, R > 1 ranks run under the mpiexec next to this Python (the `mpi`
extra), once with --shard-optimizer and once with --no-shard-optimizer. From rank 0's
spheres.json root: comm_bytes_per_step (the payload it delivers to the other ranks: the gradient
exchange, the loss and norm exchanges, the parameter all-gather), comm_ms_per_step (time inside
collectives, waiting for the slower rank included), optimizer_ms_per_step (AdamW on its chunks)
and peak_rss_mib (its peak resident memory). The rate is measured from metrics.jsonl over the
steps after --warmup-steps (the same global batch for every R, so the same work). The estimate of
`crystal train --dry-run` (crystal.memory) is printed beside the measured memory. Configurations
alternate for --rounds rounds; the fastest round counts, memory is the largest seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crystal.config import resolve
from crystal.memory import memory_estimate
from run_rate import rate_after


def run(preset: str, ranks: int, shard: bool, spheres: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "crystal.cli", "train", "--preset", preset, "--device", "cpu",
               "--spheres", str(spheres), "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "0",
               "--quiet", "--shard-optimizer" if shard else "--no-shard-optimizer", "--out", str(out),
               "--optimizer", "adamw", *extra]  # AdamW (ZeRO-1), as the estimate; small's default is Muon
        if ranks > 1:
            mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            if mpiexec is None:
                sys.exit("no mpiexec: pip install -e '.[mpi]'")
            cmd = [mpiexec, "-n", str(ranks), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        tokens_per_s, ms_per_step = rate_after(out, warmup)
        root = json.loads((out / "spheres.json").read_text())["root"]
        return {"tokens_per_s": tokens_per_s, "ms_per_step": ms_per_step,
                "comm_bytes_per_step": root.get("comm_bytes_per_step", 0),
                "comm_ms_per_step": root.get("comm_ms_per_step", 0.0),
                "optimizer_ms_per_step": root["optimizer_ms_per_step"],
                "peak_rss_mib": root["peak_rss_mib"]}


def estimate_mib(preset: str, extra: list[str], ranks: int, shard: bool, spheres: int) -> dict:
    """--dry-run's per-rank estimate for this configuration (model flags of `extra` applied)."""
    over = {}
    for flag in ("--n-layer", "--n-head", "--n-embd", "--block-size"):
        if flag in extra:
            over[flag[2:].replace("-", "_")] = int(extra[extra.index(flag) + 1])
    train_over = {}
    for flag in ("--micro-batches", "--batch-size", "--seq-len"):
        if flag in extra:
            train_over[flag[2:].replace("-", "_")] = int(extra[extra.index(flag) + 1])
    model, cfg = resolve(preset, {"vocab_size": 256, **over}, train_over)  # the embedded corpus: bytes
    est = memory_estimate(model, cfg.micro_batches, spheres, cfg.batch_size, cfg.seq_len, ranks, shard=shard)
    return {k: round(est[k] / 2**20, 1) for k in ("params", "grads", "adamw_moments", "total")}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--spheres", type=int, default=1, help="spheres per rank")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    configs = [(r, s) for r in args.ranks for s in ((False,) if r == 1 else (False, True))]
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rnd in range(args.rounds):
        for c in configs if rnd % 2 == 0 else list(reversed(configs)):
            x = run(args.preset, c[0], c[1], args.spheres, args.steps, args.warmup_steps, extra)
            results[c].append(x)
            print(f"round {rnd + 1}: {c[0]} rank(s){' sharded' if c[1] else ''}: {x['tokens_per_s']:>9,.0f} tok/s, "
                  f"{x['ms_per_step']:.1f} ms/step, communication {x['comm_ms_per_step']:.2f} ms/step "
                  f"({x['comm_bytes_per_step'] / 2**20:.2f} MiB sent), optimizer {x['optimizer_ms_per_step']:.2f} ms, "
                  f"peak RSS {x['peak_rss_mib']:.0f} MiB", flush=True)
    base = max(x["tokens_per_s"] for x in results[configs[0]])
    rows = []
    for c, xs in results.items():
        best = max(xs, key=lambda x: x["tokens_per_s"])
        rows.append({"ranks": c[0], "shard_optimizer": c[1], "spheres_per_rank": args.spheres,
                     "tokens_per_s": round(best["tokens_per_s"]), "speedup": round(best["tokens_per_s"] / base, 2),
                     "ms_per_step": round(best["ms_per_step"], 2),
                     "comm_mib_sent_per_step": round(best["comm_bytes_per_step"] / 2**20, 3),
                     "comm_ms_per_step": round(best["comm_ms_per_step"], 2),
                     "optimizer_ms_per_step": round(min(x["optimizer_ms_per_step"] for x in xs), 2),
                     "peak_rss_mib_rank0": max(x["peak_rss_mib"] for x in xs),
                     "estimate_mib": estimate_mib(args.preset, extra, c[0], c[1], args.spheres)})
    print("ranks  sharded  tok/s      x     ms/step  sent MiB/step  comm ms  optim ms  peak RSS MiB  est. total MiB")
    for r in rows:
        print(f"{r['ranks']:>5}  {'yes' if r['shard_optimizer'] else 'no':>7}  {r['tokens_per_s']:>9,}  "
              f"{r['speedup']:>4.2f}  {r['ms_per_step']:>7.1f}  {r['comm_mib_sent_per_step']:>13.2f}  "
              f"{r['comm_ms_per_step']:>7.2f}  {r['optimizer_ms_per_step']:>8.2f}  {r['peak_rss_mib_rank0']:>12.0f}  "
              f"{r['estimate_mib']['total']:>14.0f}")
    out = {"preset": args.preset, "extra_flags": extra, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "steps": args.steps, "warmup_steps": args.warmup_steps, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
