"""Training startup against data size: load a memory-mapped token set and draw its first batches.

Usage (repository root):  PYTHONPATH=. python bench/bench_data_startup.py [--sizes-mb 10,200,2048] [--dir /tmp]

For each size, a crystal token file of that many bytes of ids is written sparsely (a header and
a hole: no disk, its ids read as zeros) and a fresh process runs what `crystal train` does with
the data before step 1: load_dataset (headers, the sampled fingerprint) and a BatchIterator
(B=8, T=1024, 0.1% held out), then draws 100 batches. It prints one JSON line per size: the
seconds to the first batch and the peak RSS of the process, and the same for the whole-read
path crystal used before memory maps (np.fromfile + the id scan + the sha256 of every token),
up to --whole-up-to-mb. The files are deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

MAPPED = """
import resource, sys, time
t0 = time.perf_counter()
from crystal.data import BatchIterator, load_dataset
t1 = time.perf_counter()
ds = load_dataset(sys.argv[1], 0.001)
it = BatchIterator(ds.train, 8, 1024, 0, ds.vocab_size)
it.next_batch()
t2 = time.perf_counter()
for _ in range(99):
    it.next_batch()
print(t2 - t1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

WHOLE = """
import resource, sys, time
import numpy as np
from crystal.shards import tokens_sha256
t1 = time.perf_counter()
ids = np.fromfile(sys.argv[1], dtype="<u2", offset=32)
assert int(ids.max()) < 256
h = tokens_sha256(ids)
t2 = time.perf_counter()
print(t2 - t1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def sparse_token_file(path: Path, data_bytes: int) -> None:
    count = data_bytes // 2
    with open(path, "wb") as f:
        f.write(struct.pack("<8sIIQI4x", b"CRYSTOK1", 1, 2, count, 256))
        f.truncate(32 + 2 * count)


def run(script: str, path: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return float(out[0]), int(out[1]) / 1024  # s, MiB (ru_maxrss is KiB on Linux)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", default="10,200,2048")
    ap.add_argument("--whole-up-to-mb", type=float, default=200)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for mb in (float(s) for s in a.sizes_mb.split(",")):
            path = Path(d) / "t.bin"
            sparse_token_file(path, int(mb * 2**20))
            s, rss = run(MAPPED, path)
            row = {"data_mb": mb, "startup_s": round(s, 3), "peak_rss_mib": round(rss, 1)}
            if mb <= a.whole_up_to_mb:
                s, rss = run(WHOLE, path)
                row.update(whole_read_s=round(s, 3), whole_read_peak_rss_mib=round(rss, 1))
            print(json.dumps(row), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
