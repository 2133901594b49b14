"""Memory soak: RSS over a 1,000-step run on the tiny preset; growth after step 100 must stay small.

Usage: python bench/soak_rss.py [--steps 1000] [--spheres 12]
"""

import argparse
import json
import time

from crystal.config import resolve
from crystal.trainer import train


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--spheres", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=args.steps, spheres=args.spheres,
                                                          eval_every=args.eval_every, device="cpu"))
    rss = {}
    train(model_cfg, cfg, on_step=lambda rec, s: rss.__setitem__(rec.step, rss_mb()))
    at100, end = rss[100], rss[args.steps]
    print(json.dumps({"steps": args.steps, "spheres": args.spheres, "rss_step_100_mb": round(at100, 1),
                      "rss_end_mb": round(end, 1), "max_after_100_mb": round(max(v for k, v in rss.items() if k >= 100), 1),
                      "growth_percent": round(100 * (end / at100 - 1), 2), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
