"""Does the BLAS in use give bitwise-identical products at 1 and k threads for crystal's shapes?

Usage: python bench/blas_threads_bitwise.py [--threads 2 4] [--presets tiny small shakespeare-char]

For every product of a micro-batch at each preset's shapes (the forward and both backward
products of each matmul, through crystal's own cpu kernels), 1 thread against k threads, bit for
bit: crystal.backends.cpu.blas_threads_agree, the check a cpu run makes before it gives the
cores left over by fewer spheres to BLAS. One line per shape and a verdict; exit status 1 when
any product differs (runs there keep one BLAS thread per sphere).
"""

from __future__ import annotations

import argparse
import sys

from threadpoolctl import threadpool_info

from crystal.backends.cpu import blas_threads_agree, product_shapes
from crystal.config import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "shakespeare-char"])
    args = ap.parse_args()
    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print("BLAS:", ", ".join(blas) or "none found")
    differ = 0
    for preset in args.presets:
        model, cfg = resolve(preset, {"vocab_size": 256} if preset != "shakespeare-char" else {})
        for shape in product_shapes(model.n_embd, model.vocab_size, cfg.batch_size * cfg.seq_len):
            for t in args.threads:
                same = blas_threads_agree(t, (shape,))
                differ += not same
                rows, c_in, c_out, head = shape
                print(f"{preset:>16} {'lm head' if head else 'matmul':>7} {rows:>5} x {c_in:>5} -> {c_out:>5}: "
                      f"1 vs {t} threads {'same bits' if same else 'DIFFER'}")
    print("verdict:", "every product bitwise the same" if not differ else f"{differ} products differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
