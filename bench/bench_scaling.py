"""Tokens/s of the cpu backend for several sphere counts, and a step-time breakdown by op family.

Usage: python bench/bench_scaling.py [--preset small] [--spheres 1 2 4 8 12] [--steps 40] [--json OUT]
                                     [--batch-size B --micro-batches M] [--breakdown-spheres N|0]

Each sphere count trains the same config from the same seed (so the work is identical); the
first --warmup-steps steps are not timed; rounds alternate the sphere counts so that machine
noise hits all of them alike, and the best round counts. The breakdown comes from a run with
--breakdown-spheres spheres through crystal.backends.timing.TimedBackend: CPU-seconds per op
family summed over all threads, plus the spheres' idle time (waiting for work) and the root's
time outside ops (batching, Python). --breakdown-spheres 0 skips it.

With more spheres than micro-batches some spheres idle (the preset's M=12 caps the speed-up at
12): --micro-batches 48 (with --batch-size 1) keeps 1, 2, 4, 8, 12 and 16 spheres evenly loaded.
The JSON file is rewritten after every round ("complete": false until the end), so a run cut
off by a timeout still leaves the rounds it measured.
"""

import argparse
import json
import os
import time

from crystal.backends.cpu import CpuBackend
from crystal.backends.timing import TimedBackend
from crystal.config import resolve
from crystal.trainer import train


def rate(preset: str, spheres: int, steps: int, warmup_steps: int, backend=None, split=None):
    model_cfg, cfg = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps, eval_every=0,
                                                          device="cpu", **(split or {})))
    marks = []
    result = train(model_cfg, cfg, backend=backend, on_step=lambda rec, s: marks.append(time.perf_counter()))
    timed = marks[warmup_steps:]
    return cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]), result


def breakdown(preset: str, spheres: int, steps: int, split=None) -> dict:
    be = TimedBackend(CpuBackend())
    _, result = rate(preset, spheres, steps, 1, backend=be, split=split)
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
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch [preset's]")
    ap.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step [preset's]")
    ap.add_argument("--breakdown-spheres", type=int, default=os.cpu_count() or 2, help="0: no breakdown")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    split = {k: v for k, v in (("batch_size", args.batch_size), ("micro_batches", args.micro_batches))
             if v is not None}
    _, cfg = resolve(args.preset, train_overrides=split)
    out = {"preset": args.preset, "cores": os.cpu_count(), "steps": args.steps, "warmup_steps": args.warmup_steps,
           "batch_size": cfg.batch_size, "micro_batches": cfg.micro_batches, "seq_len": cfg.seq_len,
           "tokens_per_step": cfg.tokens_per_step, "date": time.strftime("%Y-%m-%d"), "rounds": 0, "rows": [],
           "breakdown_spheres": args.breakdown_spheres, "breakdown": None, "complete": False}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)

    t0 = time.perf_counter()
    rate(args.preset, 1, args.warmup_steps + 2, 0, split=split)  # compile / load kernels once
    out["compile_run_s"] = round(time.perf_counter() - t0, 1)
    results = {s: [] for s in args.spheres}
    for r in range(args.rounds):
        for s in args.spheres if r % 2 == 0 else reversed(args.spheres):
            results[s].append(rate(args.preset, s, args.steps, args.warmup_steps, split=split)[0])
            print(f"round {r} spheres {s:>3}: {results[s][-1]:>10,.0f} tok/s", flush=True)
        base = max(results[args.spheres[0]])
        out["rounds"] = r + 1
        out["rows"] = [{"spheres": s, "tokens_per_s": round(max(v)), "speedup": round(max(v) / base, 2),
                        "rounds_tokens_per_s": [round(x) for x in v]} for s, v in results.items() if v]
        save()
    for row in out["rows"]:
        print(f"spheres {row['spheres']:>3}: {row['tokens_per_s']:>8,} tok/s  x{row['speedup']:.2f}")
    if args.breakdown_spheres > 0:
        bd = breakdown(args.preset, args.breakdown_spheres, args.steps, split)
        print(f"breakdown with {args.breakdown_spheres} spheres (CPU-seconds over {args.steps} steps):")
        for k, v in bd.items():
            print(f"  {k:<24} {v['seconds']:>8.3f} s  {v['percent']:>5.1f}%")
        out["breakdown"] = bd
    out["complete"] = True
    save()


if __name__ == "__main__":
    main()
