"""Two presets' validation loss at equal wall time, trained at the same time on a shared machine.

Usage: python bench/bench_quality_pair.py [--presets small llama-small] [--spheres 1] [--steps 600]
                                          [--eval-every 100] [--max-seconds S] [--seed 1337] [--json OUT]

Runs bench/bench_quality.py once per preset, all at once (subprocesses started together, each with
--spheres sphere threads and the same --steps, --eval-every, --seed and --max-seconds), so that on a
machine shared with other work each run sees the same load over the same seconds: their val-loss
rows are comparable by wall time, not only by step. Prints and writes (--json) every run's rows, and
for each run the val loss of its last evaluation at or before each time the others were evaluated
("at equal wall time": the first time every run has reached, and each run's last row before it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "llama-small"])
    ap.add_argument("--spheres", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quality-pair-"))
    procs, load = {}, os.getloadavg()
    t0 = time.perf_counter()
    for p in args.presets:
        cmd = [sys.executable, str(HERE / "bench_quality.py"), "--preset", p, "--spheres", str(args.spheres),
               "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--seed", str(args.seed),
               "--json", str(tmp / f"{p}.json")]
        if args.max_seconds:
            cmd += ["--max-seconds", str(args.max_seconds)]
        procs[p] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = {}
    for p, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{p} failed:\n{err[-2000:]}")
        runs[p] = json.loads((tmp / f"{p}.json").read_text())
    # equal wall time: the latest time every run has an evaluation by; each run's last row then
    horizon = min(r["rows"][-1]["seconds"] for r in runs.values())
    at_horizon = {p: max((row for row in r["rows"] if row["seconds"] <= horizon), key=lambda row: row["seconds"])
                  for p, r in runs.items()}
    out = {"bench": "quality_pair", "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
           "load_avg_at_start": load, "wall_s": round(time.perf_counter() - t0, 1), "presets": args.presets,
           "spheres": args.spheres, "steps": args.steps, "seed": args.seed, "equal_wall_time_s": horizon,
           "at_equal_wall_time": at_horizon,
           "final": {p: r["final"] for p, r in runs.items()},
           "rows": {p: r["rows"] for p, r in runs.items()}}
    for p, r in runs.items():
        print(p, " ".join(f"{row['val_loss']:.3f}@{row['step']}({row['seconds']:.0f}s)" for row in r["rows"]))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
