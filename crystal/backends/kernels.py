"""The CUDA kernels of `kernels/*.cu`: where they live, their arguments, their launch shapes.

One table, used by the cuda backend to launch them with cupy and by the CPU-emulation tests to
launch the very same sources compiled with g++, so both use the same launch geometry.
Argument kinds: 'ptr' (device pointer), 'i32', 'i64', 'f32', 'f64'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def kernels_dir() -> Path:
    """The packaged kernels (crystal/kernels in a wheel) or the checkout's top-level kernels/."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if candidate.is_dir() and any(candidate.glob("*.cu")):
            return candidate
    return here.parent / "kernels"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# AdamW's per-step scalars in device memory: the nine AdamWScalars fields, then the skip flag
ADAMW_SCALARS = 10

# Deterministic reductions over a flat buffer use this many blocks, whatever the GPU: the
# partial sums, and so the result's rounding, never depend on the device.
REDUCE_BLOCKS = 256

# Column sums over N rows (the layernorm and bias parameter gradients, kernels/column_reduce.cuh)
# add the rows in column_parts(N) parts of consecutive rows, then the parts: the order, and so
# the rounding, is a function of N and the column count alone.
COLUMN_ROWS = 64  # rows per part (about): enough blocks to fill a GPU at GPT-2 shapes
COLUMN_PARTS_MAX = 1024  # the second stage's work stays small for very long row counts


def column_parts(N: int) -> int:
    """The number of parts P of a column sum over N rows (stage 1's gridDim.y, <= 65535)."""
    return max(1, min(cdiv(N, COLUMN_ROWS), COLUMN_PARTS_MAX))


@dataclass(frozen=True)
class Kernel:
    name: str
    file: str
    args: tuple[str, ...]


KERNELS: dict[str, Kernel] = {k.name: k for k in [
    # Each activation kernel has a `_bf16` twin (same file, argument kinds and launch shape) for
    # --precision bf16: its activation/weight arrays are bf16, math is float32, and parameter
    # gradients, mean/rstd and losses stay float32 (kernels/bf16.cuh).
    # encoder.cu
    Kernel("encoder_forward", "encoder.cu", ("ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32")),
    Kernel("encoder_forward_bf16", "encoder.cu", ("ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32")),
    Kernel("encoder_backward_wpe", "encoder.cu", ("ptr", "ptr", "i32", "i32", "i32", "i32")),
    Kernel("encoder_backward_wpe_bf16", "encoder.cu", ("ptr", "ptr", "i32", "i32", "i32", "i32")),
    Kernel("encoder_backward_wte", "encoder.cu", ("ptr", "ptr", "ptr", "ptr", "ptr", "i32", "i32")),
    Kernel("encoder_backward_wte_bf16", "encoder.cu",
           ("ptr", "ptr", "ptr", "ptr", "ptr", "i32", "i32")),
    # layernorm.cu
    Kernel("layernorm_forward", "layernorm.cu", ("ptr",) * 6 + ("i32", "i32", "f32")),
    Kernel("layernorm_forward_bf16", "layernorm.cu", ("ptr",) * 6 + ("i32", "i32", "f32")),
    Kernel("layernorm_backward_dinp", "layernorm.cu", ("ptr",) * 6 + ("i32", "i32")),
    Kernel("layernorm_backward_dinp_bf16", "layernorm.cu", ("ptr",) * 6 + ("i32", "i32")),
    # dw, db: column sums in two launches (column_parts partials, then their fixed-order sum)
    Kernel("layernorm_backward_dwdb_partial", "layernorm.cu", ("ptr",) * 5 + ("i32", "i32")),
    Kernel("layernorm_backward_dwdb_partial_bf16", "layernorm.cu", ("ptr",) * 5 + ("i32", "i32")),
    Kernel("layernorm_backward_dwdb_sum", "layernorm.cu", ("ptr",) * 3 + ("i32", "i32")),
    # fused: residual_forward + layernorm_forward in one launch (bitwise the two kernels)
    Kernel("residual_layernorm_forward", "layernorm.cu", ("ptr",) * 8 + ("i32", "i32", "f32")),
    Kernel("residual_layernorm_forward_bf16", "layernorm.cu",
           ("ptr",) * 8 + ("i32", "i32", "f32")),
    # matmul.cu (the products themselves are cuBLAS)
    Kernel("bias_forward", "matmul.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("bias_forward_bf16", "matmul.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("bias_backward_partial", "matmul.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("bias_backward_partial_bf16", "matmul.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("bias_backward_sum", "matmul.cu", ("ptr", "ptr", "i32", "i32")),
    # attention.cu (score and value products are cuBLAS batched matmuls); (B, T, NH, KV, hs):
    # KV key/value heads (grouped-query attention; GPT-2: KV = NH)
    Kernel("attention_permute", "attention.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("attention_permute_bf16", "attention.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("attention_unpermute", "attention.cu", ("ptr",) * 2 + ("i32",) * 4),
    Kernel("attention_unpermute_bf16", "attention.cu", ("ptr",) * 2 + ("i32",) * 4),
    Kernel("attention_unpermute_backward", "attention.cu", ("ptr",) * 2 + ("i32",) * 4),
    Kernel("attention_unpermute_backward_bf16", "attention.cu", ("ptr",) * 2 + ("i32",) * 4),
    Kernel("attention_permute_backward", "attention.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("attention_permute_backward_bf16", "attention.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("softmax_causal_forward", "attention.cu", ("ptr", "ptr", "i32", "i32", "f32")),
    Kernel("softmax_causal_forward_bf16", "attention.cu", ("ptr", "ptr", "i32", "i32", "f32")),
    Kernel("softmax_causal_backward", "attention.cu", ("ptr", "ptr", "ptr", "i32", "i32", "f32")),
    Kernel("softmax_causal_backward_bf16", "attention.cu",
           ("ptr", "ptr", "ptr", "i32", "i32", "f32")),
    # rmsnorm.cu (Llama): forward, dinp, dw as column sums in two launches, fused residual
    Kernel("rmsnorm_forward", "rmsnorm.cu", ("ptr",) * 4 + ("i32", "i32", "f32")),
    Kernel("rmsnorm_forward_bf16", "rmsnorm.cu", ("ptr",) * 4 + ("i32", "i32", "f32")),
    Kernel("rmsnorm_backward_dinp", "rmsnorm.cu", ("ptr",) * 5 + ("i32", "i32")),
    Kernel("rmsnorm_backward_dinp_bf16", "rmsnorm.cu", ("ptr",) * 5 + ("i32", "i32")),
    Kernel("rmsnorm_backward_dw_partial", "rmsnorm.cu", ("ptr",) * 4 + ("i32", "i32")),
    Kernel("rmsnorm_backward_dw_partial_bf16", "rmsnorm.cu", ("ptr",) * 4 + ("i32", "i32")),
    Kernel("rmsnorm_backward_dw_sum", "rmsnorm.cu", ("ptr",) * 2 + ("i32", "i32")),
    Kernel("residual_rmsnorm_forward", "rmsnorm.cu", ("ptr",) * 6 + ("i32", "i32", "f32")),
    Kernel("residual_rmsnorm_forward_bf16", "rmsnorm.cu", ("ptr",) * 6 + ("i32", "i32", "f32")),
    # rope.cu (Llama): rotary embeddings in place on qkv's q and k heads; (B, T, NH, KV, hd)
    Kernel("rope_forward", "rope.cu", ("ptr",) * 3 + ("i32",) * 5),
    Kernel("rope_forward_bf16", "rope.cu", ("ptr",) * 3 + ("i32",) * 5),
    Kernel("rope_backward", "rope.cu", ("ptr",) * 3 + ("i32",) * 5),
    Kernel("rope_backward_bf16", "rope.cu", ("ptr",) * 3 + ("i32",) * 5),
    # swiglu.cu (Llama): out = silu(gate) * up of gu = [gate | up]; (N, I)
    Kernel("swiglu_forward", "swiglu.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("swiglu_forward_bf16", "swiglu.cu", ("ptr", "ptr", "i32", "i32")),
    Kernel("swiglu_backward", "swiglu.cu", ("ptr", "ptr", "ptr", "i32", "i32")),
    Kernel("swiglu_backward_bf16", "swiglu.cu", ("ptr", "ptr", "ptr", "i32", "i32")),
    # gelu.cu, residual.cu
    Kernel("gelu_forward", "gelu.cu", ("ptr", "ptr", "i32")),
    Kernel("gelu_forward_bf16", "gelu.cu", ("ptr", "ptr", "i32")),
    Kernel("gelu_backward", "gelu.cu", ("ptr", "ptr", "ptr", "i32")),
    Kernel("gelu_backward_bf16", "gelu.cu", ("ptr", "ptr", "ptr", "i32")),
    Kernel("residual_forward", "residual.cu", ("ptr", "ptr", "ptr", "i32")),
    Kernel("residual_forward_bf16", "residual.cu", ("ptr", "ptr", "ptr", "i32")),
    # dropout.cu
    Kernel("dropout", "dropout.cu", ("ptr", "ptr", "ptr", "i32", "i64", "f32", "i32")),
    Kernel("dropout_bf16", "dropout.cu", ("ptr", "ptr", "ptr", "i32", "i64", "f32", "i32")),
    # crossentropy.cu
    # (N, V, Vp): rows Vp apart, the vocabulary their first V columns (the rest: LM-head padding)
    Kernel("crossentropy_forward", "crossentropy.cu", ("ptr",) * 4 + ("i32", "i32", "i32")),
    Kernel("crossentropy_forward_bf16", "crossentropy.cu", ("ptr",) * 4 + ("i32", "i32", "i32")),
    Kernel("crossentropy_backward", "crossentropy.cu", ("ptr",) * 3 + ("i32", "i32", "i32", "f32")),
    Kernel("crossentropy_backward_bf16", "crossentropy.cu", ("ptr",) * 3 + ("i32", "i32", "i32", "f32")),
    # fused: losses and dlogits in two passes over the logits (online softmax statistics)
    Kernel("crossentropy_forward_backward", "crossentropy.cu",
           ("ptr",) * 4 + ("i32", "i32", "i32", "f32")),
    Kernel("crossentropy_forward_backward_bf16", "crossentropy.cu",
           ("ptr",) * 4 + ("i32", "i32", "i32", "f32")),
    # cast.cu (the bf16 copy of the float32 weights, after every optimizer step)
    Kernel("cast_to_bf16", "cast.cu", ("ptr", "ptr", "i64")),
    # adamw.cu
    Kernel("adamw_update", "adamw.cu", ("ptr",) * 5 + ("i32", "i64", "ptr")),
    # fused: adamw_update + cast_to_bf16 of the new params (params_bf16 right after params)
    Kernel("adamw_update_copy_bf16", "adamw.cu", ("ptr",) * 6 + ("i32", "i64", "ptr")),
    # norm.cu
    Kernel("sum_squares_partial", "norm.cu", ("ptr", "ptr", "i64")),
    Kernel("sum_partial", "norm.cu", ("ptr", "ptr", "i64")),
    Kernel("sum_doubles", "norm.cu", ("ptr", "ptr", "i32")),
    # fused: add_inplace + scale_inplace + sum_squares_partial (REDUCE_BLOCKS blocks, bitwise)
    Kernel("add_scale_sum_squares_partial", "norm.cu", ("ptr", "ptr", "f64", "ptr", "i64")),
    # the step's norm, clipping factor and skip flag into AdamW's device scalars (graph steps)
    Kernel("step_scalars", "norm.cu", ("ptr",) * 3 + ("i32", "ptr", "i32", "f64")),
    # reduce.cu
    Kernel("add_inplace", "reduce.cu", ("ptr", "ptr", "i64")),
    Kernel("scale_inplace", "reduce.cu", ("ptr", "f64", "i64")),
    # kv_cache.cu (inference, crystal.generate): embedding at positions, rotary at positions
    # (llama), cache store, attention against the cache (GQA), one row per sequence
    Kernel("embed_at", "kv_cache.cu", ("ptr",) * 5 + ("i32",) * 3),
    Kernel("embed_at_bf16", "kv_cache.cu", ("ptr",) * 5 + ("i32",) * 3),
    Kernel("rope_at", "kv_cache.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("rope_at_bf16", "kv_cache.cu", ("ptr",) * 4 + ("i32",) * 5),
    Kernel("kv_store", "kv_cache.cu", ("ptr",) * 4 + ("i32",) * 6),
    Kernel("kv_store_bf16", "kv_cache.cu", ("ptr",) * 4 + ("i32",) * 6),
    Kernel("kv_attention", "kv_cache.cu", ("ptr",) * 6 + ("i32",) * 6 + ("f32",)),
    Kernel("kv_attention_bf16", "kv_cache.cu", ("ptr",) * 6 + ("i32",) * 6 + ("f32",)),
    Kernel("gather_rows", "kv_cache.cu", ("ptr",) * 3 + ("i32",) * 3),
    Kernel("gather_rows_bf16", "kv_cache.cu", ("ptr",) * 3 + ("i32",) * 3),
]}


def grid_1d(n: int, block: int) -> tuple[int, int, int]:
    return (max(1, cdiv(n, block)), 1, 1)


def column_sum_grids(N: int, C: int, sums: int, block: int):
    """(P, the `_partial` kernel's grid, the `_sum` kernel's grid) of `sums` column sums of
    [N, C] arrays: a thread per column and part of the rows, then a warp per output column."""
    P = column_parts(N)
    return P, (cdiv(C, block), P, 1), grid_1d(32 * sums * C, block)


def grid_rows(rows: int) -> tuple[int, int, int]:
    """One block per row (block-level reductions)."""
    return (max(1, rows), 1, 1)
