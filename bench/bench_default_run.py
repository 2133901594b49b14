"""Time `crystal train` with no options (default preset, embedded corpus), as a user runs it.
The default preset is small: Muon for 1000 steps.

Usage: python bench/bench_default_run.py [--json OUT.json] [-- crystal train flags]
       (`-- --optimizer adamw`: the earlier default run, 2000 AdamW steps)
Prints wall time, final loss, mean of the last 20 losses and mean tokens/s.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="extra flags for crystal train")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "crystal", "train", *args.extra], cwd=tmp,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"crystal train failed:\n{proc.stderr}")
        (run,) = (Path(tmp) / "runs").iterdir()
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [l for l in lines if "loss" in l]
    vals = [l for l in lines if "val_loss" in l]
    losses = [r["loss"] for r in rows]
    result = {
        "command": "crystal train " + " ".join(args.extra),
        "machine": f"{platform.processor() or platform.machine()}",
        "wall_s": round(wall, 1),
        "train_s": round(rows[-1]["elapsed"], 1),
        "steps": len(rows),
        "final_loss": round(losses[-1], 4),
        "last20_loss": round(sum(losses[-20:]) / 20, 4),
        "val_loss": round(vals[-1]["val_loss"], 4) if vals else None,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / len(rows)),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
