"""Does the BLAS in use give bitwise-identical products at 1 and k threads for crystal's shapes?

Usage: python bench/blas_threads_bitwise.py [--threads 2 4] [--presets tiny small shakespeare-char]

For every product of a training step (forward, and the two products of each backward) at each
preset's shapes, sgemm through NumPy (the BLAS crystal's kernels call, crystal.backends.cpu_blas)
with 1 thread and with k threads, compared bit for bit. Prints one line per shape and a verdict;
exit status 1 when any product differs (then crystal keeps one BLAS thread per sphere).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from crystal.config import resolve


def shapes(preset: str) -> list[tuple[int, int, int]]:
    """(M, K, N) of out[M, N] = a[M, K] @ b[K, N] for the products of one micro-batch."""
    model, cfg = resolve(preset, {"vocab_size": 256} if preset != "shakespeare-char" else {})
    bt, c, v = cfg.batch_size * cfg.seq_len, model.n_embd, model.vocab_size
    out = []
    for k, n in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c), (c, v)):  # qkv, attproj, fc, fcproj, lm head
        out += [(bt, k, n), (bt, n, k), (k, bt, n)]  # forward, d input, d weight
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "shakespeare-char"])
    args = ap.parse_args()
    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print("BLAS:", ", ".join(blas) or "none found")
    rng = np.random.default_rng(0)
    differ = 0
    for preset in args.presets:
        for m, k, n in sorted(set(shapes(preset))):
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            with threadpool_limits(1, user_api="blas"):
                one = a @ b
            for t in args.threads:
                with threadpool_limits(t, user_api="blas"):
                    many = a @ b
                same = one.tobytes() == many.tobytes()
                differ += not same
                print(f"{preset:>16} {m:>5} x {k:>5} x {n:>5}: 1 vs {t} threads {'same bits' if same else 'DIFFER'}")
    print("verdict:", "every product bitwise the same" if not differ else f"{differ} products differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
