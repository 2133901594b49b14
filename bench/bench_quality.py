"""Validation loss against wall time and tokens seen, on Tiny Shakespeare with a 90/10 split.

Usage: python bench/bench_quality.py [--preset small] [--spheres 2] [--steps 5000]
                                     [--eval-every 250] [--target 1.88] [--json OUT]

Trains the preset on the embedded corpus (last 10% held out, as nanoGPT) and prints one row per
evaluation: step, tokens seen, seconds, train loss, val loss; then the first time the val loss
reached --target (nanoGPT's CPU baseline for the small config is 1.88 nats per byte).
"""

import argparse
import json
import time

from crystal.config import resolve
from crystal.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--spheres", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    over = dict(spheres=args.spheres, eval_every=args.eval_every, device="cpu")
    if args.steps:
        over["steps"] = args.steps
    model_cfg, cfg = resolve(args.preset, train_overrides=over)
    t0 = time.perf_counter()
    losses, rows = [], []

    def on_step(rec, spheres):
        losses.append(rec.loss)

    def on_eval(step, val):
        row = {"step": step, "tokens": step * cfg.tokens_per_step, "seconds": round(time.perf_counter() - t0, 1),
               "train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "val_loss": round(val, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    train(model_cfg, cfg, on_step=on_step, on_eval=on_eval)
    hit = next((r for r in rows if r["val_loss"] <= args.target), None)
    out = {"preset": args.preset, "spheres": args.spheres, "steps": cfg.steps, "target": args.target,
           "reached": hit, "final": rows[-1] if rows else None, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
