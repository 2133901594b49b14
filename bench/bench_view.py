"""Cost of the live view: tokens/s with the rich sphere-ring view against --quiet, alternating.

Usage: python bench/bench_view.py [--preset small] [--spheres 2] [--steps 80] [--rounds 3]

The live view renders to a terminal-like console writing to /dev/null at its normal refresh
rate (2 per second), so the full rendering cost is paid; the quiet run renders nothing.
"""

import argparse
import json
import os
import time

from rich.console import Console

from crystal.backends.cpu import CpuBackend
from crystal.config import resolve
from crystal.dashboard import LiveView, QuietView
from crystal.model import warm_up
from crystal.trainer import train


def rate(view, preset, spheres, steps, warmup, be) -> float:
    m, c = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps, eval_every=0, device="cpu"))
    marks = []

    def on_step(rec, s):
        view.step(rec, s)
        marks.append(time.perf_counter())

    try:
        train(m, c, backend=be, on_start=view.start, on_step=on_step, on_eval=view.eval)
    finally:
        view.close()
    t = marks[warmup:]
    return c.tokens_per_step * (len(t) - 1) / (t[-1] - t[0])


def frame_cost_ms(n_spheres: int = 12, frames: int = 50) -> float:
    """Wall time to render one full frame (ring, progress, table) to a terminal console."""
    from crystal.dashboard import Snapshot, render

    console = Console(file=open(os.devnull, "w"), force_terminal=True, width=120)
    snap = Snapshot(preset="small", device="cpu", steps=2000, step=500, loss=2.0, losses=[2.0] * 200,
                    spheres=[{"sphere": i, "batches": 500, "avg_loss": 2.0, "utilization": 0.8,
                              "tokens_per_s": 1000.0} for i in range(n_spheres)])
    console.print(render(snap))
    t0 = time.perf_counter()
    for _ in range(frames):
        console.print(render(snap))
    return 1e3 * (time.perf_counter() - t0) / frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--spheres", type=int, default=2)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    be = CpuBackend()
    warm_up(be)
    devnull = open(os.devnull, "w")
    res = {"live": [], "quiet": []}
    for r in range(args.rounds):
        for kind in ("live", "quiet") if r % 2 == 0 else ("quiet", "live"):
            view = LiveView(Console(file=devnull, force_terminal=True, width=120)) if kind == "live" \
                else QuietView(None, 10)
            res[kind].append(rate(view, args.preset, args.spheres, args.steps, args.warmup_steps, be))
            print(f"round {r + 1} {kind:>5}: {res[kind][-1]:,.0f} tok/s", flush=True)
    live, quiet = sum(res["live"]) / args.rounds, sum(res["quiet"]) / args.rounds
    frame = frame_cost_ms()
    print(json.dumps({"frame_ms_12_spheres": round(frame, 2),
                      "render_cpu_percent_at_2hz_of_all_cores": round(100 * 2 * frame / 1e3 / os.cpu_count(), 2),
                      "preset": args.preset, "spheres": args.spheres, "live_tokens_per_s": round(live),
                      "quiet_tokens_per_s": round(quiet), "cost_percent": round(100 * (1 - live / quiet), 2),
                      "rounds": res, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
