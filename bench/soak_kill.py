"""kill -9 soak: trials of a training run killed at a random moment, then resumed; each final
model and loss history must be bitwise those of an uninterrupted run.

Usage: python bench/soak_kill.py [--trials 20] [--steps 60]
Each trial starts `crystal train --preset tiny --checkpoint-every 1`, kills it with SIGKILL
after a random number of logged steps (possibly in the middle of writing a checkpoint), runs
`crystal train --resume` to the end and compares. Prints the count of identical trials.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def losses(run: Path) -> list:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = [sys.executable, "-m", "crystal", "train", "--preset", "tiny", "--spheres", "3", "--quiet",
            "--steps", str(args.steps), "--checkpoint-every", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run([*base, "--out", str(ref)], check=True, capture_output=True)
        ok = 0
        for trial in range(args.trials):
            run = Path(tmp) / f"t{trial}"
            proc = subprocess.Popen([*base, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = rng.randint(1, args.steps - 1)
            while proc.poll() is None:
                try:
                    if sum('"loss"' in l for l in (run / "metrics.jsonl").read_text().splitlines()) >= target:
                        break
                except OSError:
                    pass
                time.sleep(rng.uniform(0.0, 0.02))
            proc.kill()
            proc.wait()
            if not (run / "model.safetensors").exists():
                subprocess.run([sys.executable, "-m", "crystal", "train", "--resume", str(run), "--quiet"],
                               check=True, capture_output=True)
            same = ((run / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
                    and losses(run) == losses(ref))
            ok += same
            print(f"trial {trial + 1:>2}: killed near step {target:>3}: {'identical' if same else 'DIFFERENT'}",
                  flush=True)
    print(json.dumps({"trials": args.trials, "identical": ok, "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
