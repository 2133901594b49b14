"""The parameter-gradient column sums on a GPU: the old kernels (one thread per column, all N rows
serially) against the two-stage ones (kernels/column_reduce.cuh), at GPT-2 124M shapes.

Usage (GPU machine, repository root): PYTHONPATH=. python3 bench/bench_reduce_kernels.py
    [--rows 16384] [--width 768] [--reps 20] [--rounds 5] [--json OUT]

Per kernel (layernorm's dw, db at C = width; a bias gradient at OC = width, 3 width and 4 width)
and precision (fp32; bf16 activations): milliseconds per call (cupy events around --reps calls,
the best of --rounds; the new one's two launches counted together), the speed-up, and each
result's relative error (max |x - ref| / max |ref|) against a float64 sum of the same inputs.
The old kernels are kept here as a source string (they left kernels/ with issue 27); the new
ones are launched as the cuda backend launches them (CudaBackend._column_sums).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystal.backends.kernels import column_sum_grids, grid_1d, kernels_dir  # noqa: E402

# The column sums before issue 27, verbatim but for the names (`_serial`): grid_1d(C), a thread per
# column adding rows 0..N-1 in order.
OLD_SOURCE = r'''
#include "bf16.cuh"

template <class A>
__device__ void layernorm_backward_dwdb_impl(float* dw, float* db, const A* dout, const A* inp,
                                             const float* mean, const float* rstd, int N, int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int i = 0; i < N; ++i) {
    long long j = (long long)i * C + c;
    float norm = (load(inp + j) - mean[i]) * rstd[i];
    float d = load(dout + j);
    sw += norm * d;
    sb += d;
  }
  dw[c] = sw;
  db[c] = sb;
}

extern "C" __global__ void layernorm_backward_dwdb_serial(float* dw, float* db, const float* dout,
    const float* inp, const float* mean, const float* rstd, int N, int C) {
  layernorm_backward_dwdb_impl(dw, db, dout, inp, mean, rstd, N, C);
}

extern "C" __global__ void layernorm_backward_dwdb_serial_bf16(float* dw, float* db, const bf16* dout,
    const bf16* inp, const float* mean, const float* rstd, int N, int C) {
  layernorm_backward_dwdb_impl(dw, db, dout, inp, mean, rstd, N, C);
}

template <class A> __device__ void bias_backward_impl(float* dbias, const A* dout, int N, int OC) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  float acc = 0.0f;
  for (int i = 0; i < N; ++i) acc += load(dout + (long long)i * OC + o);
  dbias[o] = acc;
}

extern "C" __global__ void bias_backward_serial(float* dbias, const float* dout, int N, int OC) {
  bias_backward_impl(dbias, dout, N, OC);
}

extern "C" __global__ void bias_backward_serial_bf16(float* dbias, const bf16* dout, int N, int OC) {
  bias_backward_impl(dbias, dout, N, OC);
}
'''


def bf16_bits(cp, x):
    """float32 -> bf16 bits (uint16), round to nearest even (finite inputs)."""
    u = x.view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)


def widen(cp, h):
    return (h.astype(cp.uint32) << 16).view(cp.float32)


def timed_ms(cp, fn, reps: int, rounds: int) -> float:
    """Best of `rounds` of the mean time per call over `reps` calls, by cupy events."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    best = float("inf")
    for _ in range(rounds):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) / reps)
    return best


def rel_err(cp, x, ref) -> float:
    return float(cp.abs(x.astype(cp.float64) - ref).max() / cp.maximum(cp.abs(ref).max(), 1e-30))


def bench(rows: int, width: int, reps: int, rounds: int) -> dict:
    import cupy as cp

    from crystal.backends.cuda import BLOCK, _module

    old = cp.RawModule(code=OLD_SOURCE, options=("--std=c++17", f"-I{kernels_dir()}"))
    new = {f: _module(f) for f in ("layernorm.cu", "matmul.cu")}
    rng = cp.random.default_rng(0)
    N = rows
    results = []
    for precision in ("fp32", "bf16"):
        sfx = "_bf16" if precision == "bf16" else ""

        def act(x):
            return bf16_bits(cp, x) if precision == "bf16" else x

        def as_f32(x):
            return widen(cp, x) if precision == "bf16" else x

        # layernorm dw, db
        C = width
        dout = act(rng.standard_normal((N, C), dtype=cp.float32))
        inp = act(rng.standard_normal((N, C), dtype=cp.float32) * 2 + 0.5)
        x = as_f32(inp).astype(cp.float64)
        mean64 = x.mean(axis=1)
        rstd64 = 1.0 / cp.sqrt(((x - mean64[:, None]) ** 2).mean(axis=1) + 1e-5)
        mean, rstd = mean64.astype(cp.float32), rstd64.astype(cp.float32)
        d64 = as_f32(dout).astype(cp.float64)
        norm64 = (x - mean.astype(cp.float64)[:, None]) * rstd.astype(cp.float64)[:, None]
        ref_dw, ref_db = (norm64 * d64).sum(axis=0), d64.sum(axis=0)
        dw, db = cp.empty(C, cp.float32), cp.empty(C, cp.float32)
        serial = old.get_function("layernorm_backward_dwdb_serial" + sfx)
        P, g1, g2 = column_sum_grids(N, C, 2, BLOCK)
        partial = cp.empty((2 * P, C), cp.float32)
        part_k = new["layernorm.cu"].get_function("layernorm_backward_dwdb_partial" + sfx)
        sum_k = new["layernorm.cu"].get_function("layernorm_backward_dwdb_sum")

        def ln_old():
            serial(grid_1d(C, BLOCK), (BLOCK, 1, 1), (dw, db, dout, inp, mean, rstd, np.int32(N), np.int32(C)))

        def ln_new():
            part_k(g1, (BLOCK, 1, 1), (partial, dout, inp, mean, rstd, np.int32(N), np.int32(C)))
            sum_k(g2, (BLOCK, 1, 1), (dw, db, partial, np.int32(P), np.int32(C)))

        row = {"kernel": "layernorm_backward_dwdb", "precision": precision, "N": N, "C": C, "parts": P}
        for name, fn in (("old", ln_old), ("new", ln_new)):
            row[f"{name}_ms"] = round(timed_ms(cp, fn, reps, rounds), 4)
            fn()
            row[f"{name}_rel_err_dw"] = rel_err(cp, dw, ref_dw)
            row[f"{name}_rel_err_db"] = rel_err(cp, db, ref_db)
        row["speedup"] = round(row["old_ms"] / row["new_ms"], 1)
        results.append(row)
        print(json.dumps(row), flush=True)

        # bias gradients (fp32 trains through these; bf16 takes cuBLASLt's epilogue: for reference)
        for OC in (width, 3 * width, 4 * width):
            dout = act(rng.standard_normal((N, OC), dtype=cp.float32))
            ref = as_f32(dout).astype(cp.float64).sum(axis=0)
            dbias = cp.empty(OC, cp.float32)
            serial = old.get_function("bias_backward_serial" + sfx)
            P, g1, g2 = column_sum_grids(N, OC, 1, BLOCK)
            partial = cp.empty((P, OC), cp.float32)
            part_k = new["matmul.cu"].get_function("bias_backward_partial" + sfx)
            sum_k = new["matmul.cu"].get_function("bias_backward_sum")

            def b_old():
                serial(grid_1d(OC, BLOCK), (BLOCK, 1, 1), (dbias, dout, np.int32(N), np.int32(OC)))

            def b_new():
                part_k(g1, (BLOCK, 1, 1), (partial, dout, np.int32(N), np.int32(OC)))
                sum_k(g2, (BLOCK, 1, 1), (dbias, partial, np.int32(P), np.int32(OC)))

            row = {"kernel": "bias_backward", "precision": precision, "N": N, "C": OC, "parts": P}
            for name, fn in (("old", b_old), ("new", b_new)):
                row[f"{name}_ms"] = round(timed_ms(cp, fn, reps, rounds), 4)
                fn()
                row[f"{name}_rel_err"] = rel_err(cp, dbias, ref)
            row["speedup"] = round(row["old_ms"] / row["new_ms"], 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    # per micro-batch of GPT-2 124M (12 layers): 2 layernorm backwards a layer + the final one;
    # in fp32 also the 4 bias gradients of each layer
    by = {(r["kernel"], r["precision"], r["C"]): r for r in results}
    per_mb = {}
    for precision in ("fp32", "bf16"):
        for which in ("old", "new"):
            ln = by["layernorm_backward_dwdb", precision, width][f"{which}_ms"] * 25
            bias = sum(by["bias_backward", precision, oc][f"{which}_ms"] for oc in (3 * width, width, 4 * width, width))
            per_mb[f"{precision}_{which}_ms"] = round(ln + (12 * bias if precision == "fp32" else 0.0), 3)
    return {"bench": "reduce_kernels", "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
            "block": BLOCK, "reps": reps, "rounds": rounds, "results": results,
            "per_micro_batch_gpt2": per_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16 * 1024, help="N = B*T (the gpt2 preset: 16 x 1024)")
    ap.add_argument("--width", type=int, default=768, help="C (GPT-2 124M: 768)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if min(args.rows, args.width, args.reps, args.rounds) < 1:
        print("error: --rows, --width, --reps and --rounds must be positive", file=sys.stderr)
        sys.exit(2)
    from crystal.backends.cuda import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(2)
    out = bench(args.rows, args.width, args.reps, args.rounds)
    print(json.dumps(out["per_micro_batch_gpt2"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
