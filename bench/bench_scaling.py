"""Tokens/s of the cpu backend for several sphere counts, and a step-time breakdown by op family.

Usage: python bench/bench_scaling.py [--preset small] [--spheres 1 2 4 8 12] [--steps 40] [--json OUT]

Each sphere count trains the same config from the same seed (so the work is identical); the
first --warmup-steps steps are not timed; rounds alternate the sphere counts so that machine
noise hits all of them alike, and the best round counts. The breakdown comes from a run with
--breakdown-spheres spheres through crystal.backends.timing.TimedBackend: CPU-seconds per op
family summed over all threads, plus the spheres' idle time (waiting for work) and the root's
time outside ops (batching, Python).
"""

import argparse
import json
import os
import time

from crystal.backends.cpu import CpuBackend
from crystal.backends.timing import TimedBackend
from crystal.config import resolve
from crystal.trainer import train


def rate(preset: str, spheres: int, steps: int, warmup_steps: int, backend=None):
    model_cfg, cfg = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps, eval_every=0,
                                                          device="cpu"))
    marks = []
    result = train(model_cfg, cfg, backend=backend, on_step=lambda rec, s: marks.append(time.perf_counter()))
    timed = marks[warmup_steps:]
    return cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]), result


def breakdown(preset: str, spheres: int, steps: int) -> dict:
    be = TimedBackend(CpuBackend())
    _, result = rate(preset, spheres, steps, 1, backend=be)
    fam = be.breakdown()
    busy = sum(s["busy_s"] for s in result.spheres)
    wall = result.root["wall_s"]
    fam["idle (spheres waiting)"] = max(0.0, spheres * wall - busy)
    total = sum(fam.values())
    return {k: {"seconds": round(v, 3), "percent": round(100 * v / total, 1)}
            for k, v in sorted(fam.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--spheres", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--breakdown-spheres", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rate(args.preset, 1, args.warmup_steps + 2, 0)  # compile / load kernels once
    results = {s: [] for s in args.spheres}
    for r in range(args.rounds):
        for s in args.spheres if r % 2 == 0 else reversed(args.spheres):
            results[s].append(rate(args.preset, s, args.steps, args.warmup_steps)[0])
    base = max(results[args.spheres[0]])
    rows = [{"spheres": s, "tokens_per_s": round(max(r)), "speedup": round(max(r) / base, 2)}
            for s, r in results.items()]
    for r in rows:
        print(f"spheres {r['spheres']:>3}: {r['tokens_per_s']:>8,} tok/s  x{r['speedup']:.2f}")
    bd = breakdown(args.preset, args.breakdown_spheres, args.steps)
    print(f"breakdown with {args.breakdown_spheres} spheres (CPU-seconds over {args.steps} steps):")
    for k, v in bd.items():
        print(f"  {k:<24} {v['seconds']:>8.3f} s  {v['percent']:>5.1f}%")
    out = {"preset": args.preset, "cores": os.cpu_count(), "steps": args.steps,
           "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "breakdown_spheres": args.breakdown_spheres, "breakdown": bd}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
