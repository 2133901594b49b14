"""The core gate: the default 12-sphere ring against as many spheres as cores, same config.

Usage: python bench/bench_gate.py [--preset small] [--steps 150] [--warmup-steps 30] [--rounds 4]
                                  [--spheres 12 2] [--ungated] [--json OUT]

Each configuration is `crystal train --device cpu --preset P --steps S --eval-every 0 --quiet`
with --spheres N, in a fresh process, alternating (the machine's noise hits both sides);
tokens/s from metrics.jsonl over the steps after --warmup-steps. The target: the 12-sphere rate
>= 0.95x the 2-sphere rate on 2 cores. Both run with the default core gate (12 spheres on a
2-core machine compute 2 at a time, the others wait for a core; 2 spheres are not gated there);
`--ungated` adds the first sphere count with --cores 0 (every sphere computes at once). The
ratio is the median of the per-round ratios (each round's sides ran back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_rate import rate_after


def run(preset: str, spheres: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "crystal.cli", "train", "--device", "cpu", "--preset", preset,
               "--steps", str(steps), "--eval-every", "0", "--quiet", "--spheres", str(spheres),
               "--out", str(out), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        root = json.loads((out / "spheres.json").read_text())["root"]
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        return {"tokens_per_s": rate_after(out, warmup)[0], "concurrent": root["concurrent_spheres"],
                "final_loss": last["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--spheres", type=int, nargs="+", default=[12, 2])
    ap.add_argument("--ungated", action="store_true", help="also run the first sphere count with --cores 0")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = [(n, []) for n in args.spheres]
    if args.ungated:
        configs.append((args.spheres[0], ["--cores", "0"]))
    names = [f"{n} spheres" + (" (ungated)" if extra else "") for n, extra in configs]
    res: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.rounds):
        order = list(zip(names, configs))
        for name, (n, extra) in order if rnd % 2 == 0 else order[::-1]:
            x = run(args.preset, n, args.steps, args.warmup_steps, extra)
            res[name].append(x)
            print(f"round {rnd + 1}: {name:>22}: {x['tokens_per_s']:>9,.0f} tok/s "
                  f"({x['concurrent']} computing at once)", flush=True)
    mean = {k: sum(x["tokens_per_s"] for x in v) / len(v) for k, v in res.items()}
    base = names[1] if len(names) > 1 else names[0]
    ratio = {k: statistics.median(x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(res[k], res[base]))
             for k in names}
    for k in names:
        print(f"{k:>22}: mean {mean[k]:>9,.0f} tok/s; median per-round ratio {ratio[k]:.3f}x {base}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "steps": args.steps, "cores": os.cpu_count(),
                                               "date": time.strftime("%Y-%m-%d"), "runs": res, "mean_tok_s": mean, "median_ratio": ratio},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
