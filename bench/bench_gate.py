"""The core gate and the BLAS split: sphere counts and --cores against each other, same config.

Usage: python bench/bench_gate.py [--preset small] [--steps 150] [--warmup-steps 30] [--rounds 4]
                                  [--runs 12 2 "12 --cores 0"] [--base 2] [--json OUT] [-- FLAGS...]

Each run is `crystal train --device cpu --preset P --steps S --eval-every 0 --quiet --spheres N`
plus that run's own flags (a run spec is "N [flags]") and FLAGS after `--` (for every run), in a
fresh process, alternating the order every round (the machine's noise hits every side); tokens/s
from metrics.jsonl over the steps after --warmup-steps. Ratios are to --base's run (default: the
second), the median of the per-round ratios (each round's runs ran back to back).

Issue 20's targets: the default ring (12 spheres: the core gate runs 2 at a time on a 2-core
machine, the others wait for a core) >= 0.95x the 2-sphere run (`--runs 12 2 "12 --cores 0"`);
with fewer spheres than cores, the spare cores as BLAS threads (`--runs "1 --cores 1" 1 2`:
1 sphere with 1 and with 2 BLAS threads, and 2 spheres).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_rate import rate_after


def run(preset: str, spec: str, steps: int, warmup: int, common: list[str]) -> dict:
    spheres, *extra = shlex.split(spec)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "crystal.cli", "train", "--device", "cpu", "--preset", preset,
               "--steps", str(steps), "--eval-every", "0", "--quiet", "--spheres", spheres,
               "--out", str(out), *common, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        root = json.loads((out / "spheres.json").read_text())["root"]
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        return {"tokens_per_s": rate_after(out, warmup)[0], "concurrent": root["concurrent_spheres"],
                "blas_threads": root["blas_threads"], "final_loss": last["loss"]}


def main() -> None:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", nargs="+", default=["12", "2", "12 --cores 0"])
    ap.add_argument("--base", default=None, help="the run the ratios are to [the second]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs = args.runs
    base = args.base or runs[min(1, len(runs) - 1)]
    res: dict[str, list[dict]] = {k: [] for k in runs}
    for rnd in range(args.rounds):
        for spec in runs if rnd % 2 == 0 else runs[::-1]:
            x = run(args.preset, spec, args.steps, args.warmup_steps, common)
            res[spec].append(x)
            print(f"round {rnd + 1}: {'--spheres ' + spec:>26}: {x['tokens_per_s']:>9,.0f} tok/s "
                  f"({x['concurrent']} computing at once, {x['blas_threads']} BLAS threads each)", flush=True)
    mean = {k: sum(x["tokens_per_s"] for x in v) / len(v) for k, v in res.items()}
    ratio = {k: statistics.median(x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(res[k], res[base]))
             for k in runs}
    for k in runs:
        print(f"{'--spheres ' + k:>26}: mean {mean[k]:>9,.0f} tok/s; median per-round ratio {ratio[k]:.3f}x "
              f"--spheres {base}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"preset": args.preset, "steps": args.steps, "flags": common, "cores": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d"), "runs": res, "mean_tok_s": mean, "median_ratio": ratio},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
