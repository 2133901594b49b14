"""Tokens/s of the cpu backend for several sphere counts on one preset, measured in one run.

Usage: python bench/bench_scaling.py [--preset small] [--spheres 1 2 4 8 12] [--steps 40]
Each sphere count trains the same config from the same seed (so the work is identical); the
first `--warmup-steps` steps are excluded from the rate. Rounds alternate the sphere counts
so that machine noise hits all of them alike.
"""

import argparse
import json
import os
import time

from crystal.config import resolve
from crystal.trainer import train


def rate(preset: str, spheres: int, steps: int, warmup_steps: int) -> float:
    model_cfg, cfg = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps))
    marks = []
    train(model_cfg, cfg, on_step=lambda rec, s: marks.append(time.perf_counter()))
    timed = marks[warmup_steps:]
    return cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--spheres", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rate(args.preset, 1, args.warmup_steps + 2, 0)  # compile / load kernels once
    results = {s: [] for s in args.spheres}
    for _ in range(args.rounds):
        for s in args.spheres:
            results[s].append(rate(args.preset, s, args.steps, args.warmup_steps))
    base = max(results[args.spheres[0]])
    rows = [{"spheres": s, "tokens_per_s": round(max(r)), "speedup": round(max(r) / base, 2)}
            for s, r in results.items()]
    out = {"preset": args.preset, "cores": os.cpu_count(), "steps": args.steps,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    for r in rows:
        print(f"spheres {r['spheres']:>3}: {r['tokens_per_s']:>8,} tok/s  x{r['speedup']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
