"""Validation loss against wall time and tokens seen, on Tiny Shakespeare with a 90/10 split.

Usage: python bench/bench_quality.py [--preset small] [--spheres 2] [--steps 5000]
                                     [--eval-every 250] [--target 1.88] [--json OUT]
                                     [--device cpu|cuda] [--precision fp32|tf32|bf16]
                                     [--batch-size B --micro-batches M] [--max-seconds S]
                                     [--stop-at-target] [--optimizer adamw|muon] [--lr LR]
                                     [--muon-lr LR] [--lr-schedule cosine|linear-cooldown]
                                     [--warmup W] [--seed S]

Trains the preset on the embedded corpus (last 10% held out, as nanoGPT) and prints one row per
evaluation: step, tokens seen, seconds, train loss, val loss; then the first time the val loss
reached --target (nanoGPT's CPU baseline for the small config is 1.88 nats per byte).
--max-seconds stops training after the first step past that wall time (the rows so far stay);
the JSON file is rewritten after every evaluation, so a run that is cut off still leaves it.
--stop-at-target stops after the first evaluation at or below --target (saves a lent GPU's time).
Flags not given take the preset's values: small trains with Muon (muon lr 0.04) for 1000 steps,
with --optimizer adamw for 2000.
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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--micro-batches", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--stop-at-target", action="store_true")
    ap.add_argument("--optimizer", default=None, choices=["adamw", "muon"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--muon-lr", type=float, default=None)
    ap.add_argument("--lr-schedule", default=None, choices=["cosine", "linear-cooldown"])
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    over = dict(spheres=args.spheres, eval_every=args.eval_every, device=args.device, precision=args.precision,
                steps=args.steps, batch_size=args.batch_size, micro_batches=args.micro_batches,
                optimizer=args.optimizer, lr=args.lr, muon_lr=args.muon_lr, lr_schedule=args.lr_schedule,
                warmup=args.warmup, seed=args.seed)
    model_cfg, cfg = resolve(args.preset, train_overrides=over)
    t0 = time.perf_counter()
    losses, rows = [], []

    def report(stopped_at=None) -> dict:
        hit = next((r for r in rows if r["val_loss"] <= args.target), None)
        out = {"preset": args.preset, "optimizer": cfg.optimizer, "lr": cfg.lr,
               "muon_lr": cfg.muon("lr") if cfg.optimizer == "muon" else None, "seed": cfg.seed,
               "lr_schedule": cfg.lr_schedule, "device": args.device, "precision": args.precision, "spheres": args.spheres,
               "batch_size": cfg.batch_size, "micro_batches": cfg.micro_batches, "steps": cfg.steps,
               "stopped_at": stopped_at, "target": args.target, "reached": hit,
               "best": min(rows, key=lambda r: r["val_loss"]) if rows else None,
               "final": rows[-1] if rows else None, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return out

    def on_step(rec, spheres):
        losses.append(rec.loss)

    def on_eval(step, val):
        row = {"step": step, "tokens": step * cfg.tokens_per_step, "seconds": round(time.perf_counter() - t0, 1),
               "train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "val_loss": round(val, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        report()

    def out_of_time() -> bool:
        if args.stop_at_target and any(r["val_loss"] <= args.target for r in rows):
            return True
        return bool(args.max_seconds) and time.perf_counter() - t0 > args.max_seconds

    result = train(model_cfg, cfg, on_step=on_step, on_eval=on_eval, should_stop=out_of_time)
    out = report(None if result.finished else len(result.losses))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
