"""Peak RSS growth of a training run against crystal's memory estimate (`--dry-run`).

Usage: python bench/bench_memory.py [--preset shakespeare-char] [--spheres 2] [--steps 2]
                                     [--vocab V --batch-size B --seq-len T --micro-batches M]

--vocab V trains on random tokens of a V-token vocabulary instead of the embedded corpus (e.g.
GPT-2's 50257 for a 124M-shaped fine-tune: `--preset gpt2 --vocab 50257 --batch-size 1
--seq-len 256 --micro-batches 8`). The output also gives the estimate the reducer had before its
gradient pool (one gradient buffer per micro-batch), for comparison.

In a fresh process: import crystal, compile the kernels, load the data, read RSS (the
baseline: interpreter, numpy, numba, the corpus); then train and read the peak RSS. The growth
is compared with crystal.memory.memory_estimate (params, the gradient pool, AdamW moments,
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
from crystal.model import warm_up
from crystal.config import resolve
from crystal.data import load_dataset
from crystal.memory import memory_estimate
from crystal.trainer import train

import numpy as np
from crystal.data import DataSet
from crystal.model import ParamLayout

preset, spheres, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vocab, over = int(sys.argv[4]), json.loads(sys.argv[5])
m, c = resolve(preset, dict(vocab_size=vocab) if vocab else {},  # AdamW: memory_estimate's optimizer
               dict(spheres=spheres, steps=steps, eval_every=0, device="cpu", optimizer="adamw", **over))
be = CpuBackend(); warm_up(be)
if vocab:  # random tokens: only the shapes matter here
    rng = np.random.default_rng(0)
    ds = DataSet(rng.integers(0, vocab, 200_000).astype(np.uint16), rng.integers(0, vocab, 20_000).astype(np.uint16),
                 None, vocab, f"random tokens, vocabulary {vocab}", 20_000)
else:
    ds = load_dataset(None, c.val_fraction)
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mb()
train(m, c, dataset=ds, backend=be)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
est = memory_estimate(m, c.micro_batches, spheres, c.batch_size, c.seq_len)
one_per_micro_batch = est["total"] - est["grads"] + c.micro_batches * 4 * ParamLayout(m).size
print(json.dumps({"baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base,
                  "estimate_mb": est["total"] / 2**20,
                  "estimate_one_buffer_per_micro_batch_mb": one_per_micro_batch / 2**20,
                  "parts_mb": {k: round(v / 2**20, 1) for k, v in est.items()}}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--spheres", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0, help="random tokens of this vocabulary [the corpus]")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batches", type=int, default=None)
    args = ap.parse_args()
    over = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                              ("micro_batches", args.micro_batches)) if v is not None}
    out = subprocess.run([sys.executable, "-c", CHILD, args.preset, str(args.spheres), str(args.steps),
                          str(args.vocab), json.dumps(over)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(preset=args.preset, spheres=args.spheres, vocab=args.vocab or "corpus", overrides=over,
             ratio=round(r["growth_mb"] / r["estimate_mb"], 3),
             date=time.strftime("%Y-%m-%d"))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
