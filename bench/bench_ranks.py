"""Tokens/s of 1 process against R ranks under mpiexec, and the communication time per step.

Usage: python bench/bench_ranks.py [--preset small] [--ranks 1 2] [--spheres 1] [--steps 200]
                                   [--rounds 2] [--json OUT]

Each configuration is a `crystal train` run (cpu, --quiet) in a fresh process group: 1 rank is
a plain process, R > 1 ranks run under the mpiexec next to this Python (the `mpi` extra). The
rate is measured from metrics.jsonl over the steps after --warmup-steps (the same global batch
for every R, so the same work); the communication time per step is rank 0's time inside
collectives (the gradient all-gather and the loss exchange, including waiting for the slower
rank), from spheres.json. Configurations alternate for --rounds rounds; the best counts.
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


def run(preset: str, ranks: int, spheres: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "crystal.cli", "train", "--preset", preset, "--device", "cpu",
               "--spheres", str(spheres), "--steps", str(steps), "--eval-every", "0", "--quiet",
               "--out", str(out)]
        if ranks > 1:
            mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            if mpiexec is None:
                sys.exit("no mpiexec: pip install -e '.[mpi]'")
            cmd = [mpiexec, "-n", str(ranks), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss" in r and "elapsed" in r]
        train = json.loads((out / "train.json").read_text())
        tokens_per_step = train["micro_batches"] * train["batch_size"] * train["seq_len"]
        a, b = recs[warmup - 1], recs[-1]
        root = json.loads((out / "spheres.json").read_text())["root"]
        return {"tokens_per_s": tokens_per_step * (b["step"] - a["step"]) / (b["elapsed"] - a["elapsed"]),
                "comm_ms_per_step": root.get("comm_ms_per_step", 0.0),
                "ms_per_step": 1e3 * (b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--spheres", type=int, default=1, help="spheres per rank")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict[int, list[dict]] = {r: [] for r in args.ranks}
    for rnd in range(args.rounds):
        for r in args.ranks if rnd % 2 == 0 else list(reversed(args.ranks)):
            results[r].append(run(args.preset, r, args.spheres, args.steps, args.warmup_steps))
            x = results[r][-1]
            print(f"round {rnd + 1}: {r} rank(s) x {args.spheres} sphere(s): {x['tokens_per_s']:>9,.0f} tok/s, "
                  f"{x['ms_per_step']:.1f} ms/step, communication {x['comm_ms_per_step']:.2f} ms/step", flush=True)
    best = {r: max(v, key=lambda x: x["tokens_per_s"]) for r, v in results.items()}
    base = best[args.ranks[0]]["tokens_per_s"]
    rows = [{"ranks": r, "spheres_per_rank": args.spheres, "tokens_per_s": round(b["tokens_per_s"]),
             "speedup": round(b["tokens_per_s"] / base, 2), "ms_per_step": round(b["ms_per_step"], 2),
             "comm_ms_per_step": round(b["comm_ms_per_step"], 2)} for r, b in best.items()]
    for row in rows:
        print(f"{row['ranks']} rank(s): {row['tokens_per_s']:>9,} tok/s  x{row['speedup']:.2f}  "
              f"{row['ms_per_step']} ms/step, of which communication {row['comm_ms_per_step']} ms")
    out = {"preset": args.preset, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "steps": args.steps, "warmup_steps": args.warmup_steps, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
