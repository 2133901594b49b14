"""Peak RSS growth of a training run against crystal's memory estimate (`--dry-run`).

Usage: python bench/bench_memory.py [--preset shakespeare-char] [--spheres 2] [--steps 2]

In a fresh process: import crystal, compile the kernels, load the data, read RSS (the
baseline: interpreter, numpy, numba, the corpus); then train and read the peak RSS. The growth
is compared with crystal.model.memory_estimate (params, the gradient pool, AdamW moments,
activations of every sphere), the numbers `crystal train --dry-run` prints.
"""

import argparse
import json
import subprocess
import sys
import time

CHILD = r'''
import json, resource, sys
from crystal.backends.cpu import CpuBackend
from crystal.config import resolve
from crystal.data import load_dataset
from crystal.model import memory_estimate
from crystal.trainer import train

preset, spheres, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m, c = resolve(preset, train_overrides=dict(spheres=spheres, steps=steps, eval_every=0, device="cpu"))
be = CpuBackend(); be.warmup()
ds = load_dataset(None, c.val_fraction)
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mb()
train(m, c, dataset=ds, backend=be)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
est = memory_estimate(m, c.micro_batches, spheres, c.batch_size, c.seq_len)
print(json.dumps({"baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base,
                  "estimate_mb": est["total"] / 2**20,
                  "parts_mb": {k: round(v / 2**20, 1) for k, v in est.items()}}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--spheres", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    out = subprocess.run([sys.executable, "-c", CHILD, args.preset, str(args.spheres), str(args.steps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(preset=args.preset, spheres=args.spheres, ratio=round(r["growth_mb"] / r["estimate_mb"], 3),
             date=time.strftime("%Y-%m-%d"))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
