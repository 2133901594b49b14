"""Every CUDA kernel of kernels/*.cu, run on the CPU under emulation, matches the cpu backend.

The .cu sources are compiled by g++ with tests/emu/emu.h (fibers for CUDA threads, a barrier
for __syncthreads) and launched with the geometry of crystal/backends/kernels.py, on odd
shapes and small blocks, including blocks that do not divide the sizes. Where cuBLAS does a
product on the GPU (attention), a numpy matmul stands in for it and the host composes the
pipeline exactly as the cuda backend does. Error measure: max|gpu - cpu| / max|cpu|.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from crystal.backends import cpu
from crystal.backends.base import AdamWScalars
from crystal.backends.cpu import CpuBackend
from crystal.backends.kernels import KERNELS, REDUCE_BLOCKS, cdiv, grid_1d, grid_rows
from emu.build import parse_global_kernels
from emu.coverage import LLAMA_FILES, Coverage, gpu, launch_column_sums
from compare import rel_err

B, T, C, NH, V = 3, 37, 48, 3, 259
HS = C // NH
N = B * T
TMAX = T + 5  # wpe has more positions than the batch uses
TOL = 1e-5  # forward and backward ops
TOL_FLAT = 1e-6  # AdamW and the double-precision sums
BLOCKS = [32, 64]  # 32 does not divide C=48, 3C or V; 64 leaves whole warps idle in some rows

be = CpuBackend()
COVERAGE = Coverage()
COVERED, covers = COVERAGE.covered, COVERAGE.covers


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def token_buckets(idx):
    """Rows of idx grouped by token: (bucket_token, bucket_start[n+1], positions), each bucket's
    positions ascending (a stable argsort of the flattened ids)."""
    flat = idx.reshape(-1)
    positions = np.argsort(flat, kind="stable").astype(np.int32)
    tokens, starts = np.unique(flat[positions], return_index=True)
    return (tokens.astype(np.int32), np.append(starts, flat.size).astype(np.int32), positions)


# --- the kernel set ----------------------------------------------------------------------------

def test_emulated_every_kernel_in_the_sources_is_in_the_kernels_table():
    assert parse_global_kernels() == {k.name: k.file for k in KERNELS.values()}


def test_emulated_every_fp32_kernel_is_exercised_by_a_test():
    """(the `_bf16` twins and cast_to_bf16: tests/test_kernels_bf16_emulated.py)"""
    fp32 = {n for n in parse_global_kernels() if not n.endswith("_bf16") and n != "cast_to_bf16"}
    fp32 -= {"residual_layernorm_forward", "crossentropy_forward_backward",
             "add_scale_sum_squares_partial"}  # tests/test_kernels_fused_emulated.py
    fp32 -= {n for n, k in KERNELS.items() if k.file == "kv_cache.cu"}  # tests/test_kernels_kv_cache_emulated.py
    fp32 -= {n for n, k in KERNELS.items() if k.file in LLAMA_FILES}  # tests/test_llama_kernels_emulated.py
    assert set(COVERED) == fp32


# --- encoder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("encoder_forward")
def test_encoder_forward_emulated_matches_cpu(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = randn(rng, V, C), randn(rng, TMAX, C)
    out = np.full((B, T, C), np.nan, np.float32)
    gpu().launch("encoder_forward", grid_1d(N * C, block), block, out, idx, wte, wpe, N, T, C)
    expected = np.empty_like(out)
    be.encoder_forward(expected, idx, wte, wpe)
    assert rel_err(out, expected) <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@covers("encoder_backward_wpe", "encoder_backward_wte")
def test_encoder_backward_emulated_matches_cpu(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx[1, :5] = idx[0, 3]  # a token repeated across rows and batches
    dout = randn(rng, B, T, C)
    dwte_head = randn(rng, V, C)  # dwte already holds the LM head's gradient
    expected_dwte, expected_dwpe = dwte_head.copy(), np.empty((TMAX, C), np.float32)
    be.encoder_backward(expected_dwte, expected_dwpe, dout, idx)

    dwpe = np.full((TMAX, C), np.nan, np.float32)  # every row is written, [T, TMAX) with 0
    gpu().launch("encoder_backward_wpe", grid_1d(TMAX * C, block), block, dwpe, dout,
                 B, T, TMAX, C)
    dwte = dwte_head.copy()
    tokens, starts, positions = token_buckets(idx)
    gpu().launch("encoder_backward_wte", (cdiv(C, block), tokens.size, 1), block,
                 dwte, dout, tokens, starts, positions, tokens.size, C)
    assert rel_err(dwpe, expected_dwpe) <= TOL
    assert rel_err(dwte, expected_dwte) <= TOL


# --- layernorm -------------------------------------------------------------------------------

def layernorm_inputs(rng):
    return randn(rng, N, C, scale=2.0) + 0.5, randn(rng, C), randn(rng, C)


@pytest.mark.parametrize("block", BLOCKS)
@covers("layernorm_forward")
def test_layernorm_forward_emulated_matches_cpu(rng, block):
    inp, w, b = layernorm_inputs(rng)
    out, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    gpu().launch("layernorm_forward", grid_rows(N), block, out, mean, rstd, inp, w, b, N, C, 1e-5)
    e_out, e_mean, e_rstd = np.empty_like(out), np.empty_like(mean), np.empty_like(rstd)
    be.layernorm_forward(e_out, e_mean, e_rstd, inp, w, b, 1e-5)
    assert rel_err(out, e_out) <= TOL
    assert rel_err(mean, e_mean) <= TOL
    assert rel_err(rstd, e_rstd) <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@covers("layernorm_backward_dinp", "layernorm_backward_dwdb_partial", "layernorm_backward_dwdb_sum")
def test_layernorm_backward_emulated_matches_cpu(rng, block):
    inp, w, b = layernorm_inputs(rng)
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    be.layernorm_forward(np.empty((N, C), np.float32), mean, rstd, inp, w, b, 1e-5)
    dout, dinp_before = randn(rng, N, C), randn(rng, N, C)  # dinp accumulates
    e_dinp, e_dw, e_db = dinp_before.copy(), np.empty(C, np.float32), np.empty(C, np.float32)
    be.layernorm_backward(e_dinp, e_dw, e_db, dout, inp, w, mean, rstd)

    dinp = dinp_before.copy()
    dw, db = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)  # written
    gpu().launch("layernorm_backward_dinp", grid_rows(N), block, dinp, dout, inp, w, mean, rstd,
                 N, C)
    launch_column_sums("layernorm_backward_dwdb", block, (dw, db), (dout, inp, mean, rstd), N, C)
    assert rel_err(dinp, e_dinp) <= TOL
    assert rel_err(dw, e_dw) <= TOL
    assert rel_err(db, e_db) <= TOL


# --- matmul bias -----------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("bias_forward", "bias_backward_partial", "bias_backward_sum")
def test_bias_forward_and_backward_emulated_match_cpu(rng, block):
    OC = 3 * C
    out, bias, dout = randn(rng, N, OC), randn(rng, OC), randn(rng, N, OC)
    expected_out, expected_dbias = out.copy(), np.empty(OC, np.float32)
    cpu.bias_forward(expected_out, bias)
    cpu.bias_backward(expected_dbias, dout)

    gpu().launch("bias_forward", grid_1d(N * OC, block), block, out, bias, N, OC)
    dbias = np.full(OC, np.nan, np.float32)
    launch_column_sums("bias_backward", block, (dbias,), (dout,), N, OC)
    assert rel_err(out, expected_out) <= TOL
    assert rel_err(dbias, expected_dbias) <= TOL


# --- attention -------------------------------------------------------------------------------

SCALE = 1.0 / math.sqrt(HS)


def per_head():
    return np.empty((B, NH, T, HS), np.float32)


def emulated_attention_forward(qkv, block):
    """permute -> preatt = q k^T -> causal softmax (in place) -> y = att v -> unpermute."""
    q, k, v = per_head(), per_head(), per_head()
    gpu().launch("attention_permute", grid_1d(q.size, block), block, q, k, v, qkv, B, T, NH, NH, HS)
    att = np.ascontiguousarray(q @ k.transpose(0, 1, 3, 2))  # cuBLAS's batched product
    gpu().launch("softmax_causal_forward", grid_rows(B * NH * T), block, att, att, B * NH, T,
                 SCALE)
    y = np.ascontiguousarray(att @ v)
    out = np.full((B, T, C), np.nan, np.float32)
    gpu().launch("attention_unpermute", grid_1d(y.size, block), block, out, y, B, T, NH, HS)
    return out, att


def emulated_attention_backward(dout, qkv, att, block):
    """unpermute_backward -> datt = dy v^T, dv = att^T dy -> causal softmax backward (in place)
    -> dq = dpre k, dk = dpre^T q -> permute_backward."""
    q, k, v, dy = per_head(), per_head(), per_head(), per_head()
    gpu().launch("attention_permute", grid_1d(q.size, block), block, q, k, v, qkv, B, T, NH, NH, HS)
    gpu().launch("attention_unpermute_backward", grid_1d(dy.size, block), block, dy, dout,
                 B, T, NH, HS)
    datt = np.ascontiguousarray(dy @ v.transpose(0, 1, 3, 2))
    dv = np.ascontiguousarray(att.transpose(0, 1, 3, 2) @ dy)
    gpu().launch("softmax_causal_backward", grid_rows(B * NH * T), block, datt, datt, att,
                 B * NH, T, SCALE)
    dq, dk = np.ascontiguousarray(datt @ k), np.ascontiguousarray(datt.transpose(0, 1, 3, 2) @ q)
    dqkv = np.full((B, T, 3 * C), np.nan, np.float32)
    gpu().launch("attention_permute_backward", grid_1d(dq.size, block), block, dqkv, dq, dk, dv,
                 B, T, NH, NH, HS)
    return dqkv


@pytest.mark.parametrize("block", BLOCKS)
@covers("attention_permute", "softmax_causal_forward", "attention_unpermute")
def test_attention_forward_emulated_matches_cpu(rng, block):
    qkv = randn(rng, B, T, 3 * C)
    out, att = emulated_attention_forward(qkv, block)
    e_out, e_att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    be.attention_forward(e_out, e_att, qkv, NH)
    assert rel_err(out, e_out) <= TOL
    assert rel_err(att, e_att) <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@covers("attention_unpermute_backward", "softmax_causal_backward", "attention_permute_backward")
def test_attention_backward_emulated_matches_cpu(rng, block):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    att = np.empty((B, NH, T, T), np.float32)
    be.attention_forward(np.empty((B, T, C), np.float32), att, qkv, NH)
    dqkv = emulated_attention_backward(dout, qkv, att, block)
    expected = np.empty_like(qkv)
    be.attention_backward(expected, dout, qkv, att, NH)
    assert rel_err(dqkv, expected) <= TOL


@covers("softmax_causal_forward", "softmax_causal_backward")
def test_causal_softmax_emulated_out_of_place_equals_in_place(rng):
    BNH = 2
    preatt, datt = randn(rng, BNH, T, T, scale=3.0), randn(rng, BNH, T, T)
    att, in_place = np.empty_like(preatt), preatt.copy()
    gpu().launch("softmax_causal_forward", grid_rows(BNH * T), 32, att, preatt, BNH, T, SCALE)
    gpu().launch("softmax_causal_forward", grid_rows(BNH * T), 32, in_place, in_place, BNH, T,
                 SCALE)
    dpre, dpre_in_place = np.empty_like(datt), datt.copy()
    gpu().launch("softmax_causal_backward", grid_rows(BNH * T), 32, dpre, datt, att, BNH, T, SCALE)
    gpu().launch("softmax_causal_backward", grid_rows(BNH * T), 32, dpre_in_place, dpre_in_place,
                 att, BNH, T, SCALE)
    np.testing.assert_array_equal(att, in_place)
    np.testing.assert_array_equal(dpre, dpre_in_place)
    causal = np.tril(np.ones((T, T), bool))
    assert np.all(att[:, ~causal] == 0) and np.all(dpre[:, ~causal] == 0)
    assert np.allclose(att.sum(-1), 1.0, atol=1e-6)


# --- gelu, residual --------------------------------------------------------------------------

@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("gelu_forward", "gelu_backward")
def test_gelu_forward_and_backward_emulated_match_cpu(rng, block, in_place):
    n = N * 4 * C
    inp, dout = randn(rng, n, scale=2.0), randn(rng, n)
    out = np.full(n, np.nan, np.float32)
    gpu().launch("gelu_forward", grid_1d(n, block), block, out, inp, n)
    dinp = dout.copy() if in_place else np.full(n, np.nan, np.float32)
    gpu().launch("gelu_backward", grid_1d(n, block), block, dinp, inp,
                 dinp if in_place else dout, n)  # in place: dinp aliases dout
    e_out, e_dinp = np.empty_like(out), np.empty_like(dinp)
    be.gelu_forward(e_out, inp)
    be.gelu_backward(e_dinp, inp, dout)
    assert rel_err(out, e_out) <= TOL
    assert rel_err(dinp, e_dinp) <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@covers("residual_forward")
def test_residual_forward_emulated_matches_cpu(rng, block):
    n = N * C
    a, b = randn(rng, n), randn(rng, n)
    out = np.full(n, np.nan, np.float32)
    gpu().launch("residual_forward", grid_1d(n, block), block, out, a, b, n)
    expected = np.empty_like(out)
    be.residual_forward(expected, a, b)
    assert rel_err(out, expected) <= TOL


@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("dropout")
def test_dropout_emulated_drops_the_elements_the_cpu_drops(rng, block, in_place):
    from crystal.dropout import Dropout

    n = N * C + 7
    d = Dropout(0.3, 11, 4, 2)
    key = d.key(1, 2)
    inp = randn(rng, n)
    out = inp.copy() if in_place else np.full(n, np.nan, np.float32)
    keys = np.array([7, key, 9], np.int64)  # the key read from device memory, keys[slot]
    gpu().launch("dropout", grid_1d(n, block), block, out, out if in_place else inp, keys, 1, d.threshold,
                 d.scale, n)
    expected = np.empty_like(inp)
    be.dropout(expected, inp, key, d.threshold, d.scale)
    assert out.tobytes() == expected.tobytes()


# --- cross-entropy ---------------------------------------------------------------------------

@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("crossentropy_forward", "crossentropy_backward")
def test_crossentropy_forward_and_backward_emulated_match_cpu(rng, block, in_place):
    VP = 320  # rows of V = 259 logits and the LM head's padding columns, NaN here: never read, written 0
    logits, targets = randn(rng, N, VP, scale=3.0), rng.integers(0, V, N).astype(np.int32)
    logits[:, V:] = np.nan
    targets[:3] = [0, V - 1, 1]  # both ends of the vocabulary
    targets[-2:] = -1  # ignored (a prompt token): loss 0, gradient row 0
    dloss = 1.0 / N
    e_losses, e_probs = np.empty(N, np.float32), np.empty_like(logits)
    be.crossentropy_forward(e_losses, e_probs, logits, targets, V)
    e_dlogits = np.empty_like(logits)
    be.crossentropy_backward(e_dlogits, e_probs, targets, dloss, V)
    assert not e_probs[:, V:].any() and not e_dlogits[:, V:].any()

    # in place: probs alias logits, then dlogits alias probs
    losses = np.full(N, np.nan, np.float32)
    probs = logits if in_place else np.full_like(logits, np.nan)
    gpu().launch("crossentropy_forward", grid_rows(N), block, losses, probs, logits, targets, N, V, VP)
    assert rel_err(losses, e_losses) <= TOL
    assert rel_err(probs, e_probs) <= TOL
    dlogits = probs if in_place else np.full_like(probs, np.nan)
    gpu().launch("crossentropy_backward", grid_1d(N * VP, block), block, dlogits, probs, targets,
                 N, V, VP, dloss)
    assert rel_err(dlogits, e_dlogits) <= TOL
    assert not losses[-2:].any() and not e_losses[-2:].any()  # the ignored targets': exactly 0
    assert not dlogits[-2:].any() and not e_dlogits[-2:].any()


# --- AdamW, sums, reducer --------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("adamw_update")
def test_adamw_update_emulated_matches_cpu(rng, block):
    n = 1001
    ranges = np.array([[0, 300, 1], [300, 333, 0], [333, 334, 1], [334, n, 0]], np.int64)
    params, grads = randn(rng, n), randn(rng, n)
    m, v = randn(rng, n, scale=0.1), np.abs(randn(rng, n, scale=0.01))
    lr, beta1, beta2, eps, wd, step, grad_scale = 3e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.7
    expected = [a.copy() for a in (params, m, v)]
    scalars = AdamWScalars.of(lr, beta1, beta2, eps, wd, step, grad_scale)
    be.adamw_update(expected[0], grads, expected[1], expected[2], ranges, scalars)
    gpu().launch("adamw_update", grid_1d(n, block), block, params, grads, m, v, ranges,
                 len(ranges), n, scalars.packed())
    for actual, e in zip((params, m, v), expected):  # float32 without FMA on both: bit for bit
        assert actual.tobytes() == e.tobytes()



@pytest.mark.parametrize("skip", [False, True])
@covers("adamw_update")
def test_adamw_update_emulated_with_the_skip_flag_set_changes_nothing(rng, skip):
    n = 77
    ranges = np.array([[0, n, 1]], np.int64)
    params, grads, m, v = randn(rng, n), randn(rng, n), randn(rng, n), np.abs(randn(rng, n))
    before = [a.copy() for a in (params, m, v)]
    scalars = AdamWScalars.of(1e-2, 0.9, 0.95, 1e-8, 0.1, 1, 1.0)
    gpu().launch("adamw_update", grid_1d(n, 32), 32, params, grads, m, v, ranges, 1, n, scalars.packed(skip))
    assert all((a.tobytes() == b.tobytes()) == skip for a, b in zip((params, m, v), before))


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e9])
@covers("step_scalars")
def test_step_scalars_emulated_is_the_hosts_norm_and_clip_bit_for_bit(rng, max_norm):
    from crystal.optim import clip_scale
    from crystal.reducer import norm_of

    chunk_sums = np.abs(rng.standard_normal(48)) * 3.7
    losses = rng.standard_normal(12) + 4.0
    out, s = np.full(1, np.nan), AdamWScalars.of(1e-3, 0.9, 0.95, 1e-8, 0.1, 5, 1.0).packed()
    gpu().launch("step_scalars", (1, 1, 1), 32, out, s, chunk_sums, 48, losses, 12, max_norm)
    norm = norm_of(chunk_sums.tolist())
    assert out[0] == norm  # the same double additions in the same order, then sqrt
    assert s[8] == np.float32(clip_scale(norm, max_norm)) and s[9] == 0.0
    assert s[:8].tobytes() == AdamWScalars.of(1e-3, 0.9, 0.95, 1e-8, 0.1, 5, 1.0).packed()[:8].tobytes()


@pytest.mark.parametrize("bad", ["loss nan", "loss inf", "norm inf", "norm nan"])
@covers("step_scalars")
def test_step_scalars_emulated_sets_skip_for_a_non_finite_loss_or_norm(rng, bad):
    chunk_sums, losses = np.ones(48), np.full(5, 2.0)
    if bad.startswith("loss"):
        losses[3] = np.nan if bad.endswith("nan") else np.inf
    else:
        chunk_sums[7] = np.inf if bad.endswith("inf") else np.nan
    out, s = np.full(1, np.nan), np.zeros(10, np.float32)
    gpu().launch("step_scalars", (1, 1, 1), 32, out, s, chunk_sums, 48, losses, 5, 1.0)
    assert s[9] == 1.0

def emulated_sum(partial_kernel, x, block):
    """REDUCE_BLOCKS partial sums, then one block adds them."""
    partial, out = np.full(REDUCE_BLOCKS, np.nan), np.full(1, np.nan)
    gpu().launch(partial_kernel, (REDUCE_BLOCKS, 1, 1), block, partial, x, x.size)
    gpu().launch("sum_doubles", (1, 1, 1), block, out, partial, REDUCE_BLOCKS)
    return float(out[0])


@pytest.mark.parametrize("block", BLOCKS)
@covers("sum_squares_partial", "sum_partial", "sum_doubles")
def test_sums_emulated_match_cpu(rng, block):
    x = randn(rng, 20011) + 2.0  # more elements than REDUCE_BLOCKS * block threads
    assert rel_err(emulated_sum("sum_squares_partial", x, block), cpu.sum_squares(x)) <= TOL_FLAT
    assert rel_err(emulated_sum("sum_partial", x, block), cpu.sum_vector(x)) <= TOL_FLAT


@covers("sum_squares_partial", "sum_doubles")
def test_sums_emulated_of_fewer_elements_than_threads(rng):
    x = randn(rng, 5)  # most blocks see no element at all
    assert rel_err(emulated_sum("sum_squares_partial", x, 32), cpu.sum_squares(x)) <= TOL_FLAT


@pytest.mark.parametrize("block", BLOCKS)
@covers("add_inplace", "scale_inplace")
def test_add_and_scale_inplace_emulated_match_cpu(rng, block):
    n = 1001
    acc, x, s = randn(rng, n), randn(rng, n), 1.0 / 3.0
    expected = acc.copy()
    be.add_inplace(expected, x)
    be.scale_inplace(expected, s)
    gpu().launch("add_inplace", grid_1d(n, block), block, acc, x, n)
    gpu().launch("scale_inplace", grid_1d(n, block), block, acc, s, n)
    assert rel_err(acc, expected) <= TOL_FLAT


# --- the largest block ------------------------------------------------------------------------

@covers("layernorm_forward", "softmax_causal_forward", "crossentropy_forward", "sum_doubles")
def test_block_reductions_emulated_with_1024_threads_per_block(rng):
    block, rows, t = 1024, 3, 5  # 32 warps; few rows, since each row is a block of 1024 threads
    inp, w, b = randn(rng, rows, C), randn(rng, C), randn(rng, C)
    out, mean, rstd = (np.empty((rows, C), np.float32), np.empty(rows, np.float32),
                       np.empty(rows, np.float32))
    gpu().launch("layernorm_forward", grid_rows(rows), block, out, mean, rstd, inp, w, b, rows, C,
                 1e-5)
    e_out = np.empty_like(out)
    be.layernorm_forward(e_out, np.empty_like(mean), np.empty_like(rstd), inp, w, b, 1e-5)
    assert rel_err(out, e_out) <= TOL

    preatt = randn(rng, 1, t, t)
    att = np.empty_like(preatt)
    gpu().launch("softmax_causal_forward", grid_rows(t), block, att, preatt, 1, t, 1.0)
    masked = np.where(np.tril(np.ones((t, t), bool)), preatt, -np.inf)
    e_att = np.exp(masked - masked.max(-1, keepdims=True))
    assert rel_err(att, e_att / e_att.sum(-1, keepdims=True)) <= TOL

    logits, targets = randn(rng, rows, 2 * block + 7), np.array([0, 5, 2 * block + 6], np.int32)
    losses, probs = np.empty(rows, np.float32), np.empty_like(logits)
    gpu().launch("crossentropy_forward", grid_rows(rows), block, losses, probs, logits, targets,
                 rows, logits.shape[1], logits.shape[1])
    e_losses, e_probs = np.empty_like(losses), np.empty_like(probs)
    be.crossentropy_forward(e_losses, e_probs, logits, targets)
    assert rel_err(losses, e_losses) <= TOL and rel_err(probs, e_probs) <= TOL

    partial, total = rng.standard_normal(REDUCE_BLOCKS) + 1.0, np.empty(1)
    gpu().launch("sum_doubles", (1, 1, 1), block, total, partial, REDUCE_BLOCKS)
    assert rel_err(total, partial.sum()) <= TOL_FLAT


# --- determinism -----------------------------------------------------------------------------

def run_reductions(rng_seed: int, block: int):
    """The block-reduction kernels on fixed inputs; returns all their outputs."""
    rng = np.random.default_rng(rng_seed)
    inp, w, b = layernorm_inputs(rng)
    ln = [np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)]
    gpu().launch("layernorm_forward", grid_rows(N), block, *ln, inp, w, b, N, C, 1e-5)
    dinp = np.zeros((N, C), np.float32)
    gpu().launch("layernorm_backward_dinp", grid_rows(N), block, dinp, randn(rng, N, C), inp, w,
                 ln[1], ln[2], N, C)
    out, att = emulated_attention_forward(randn(rng, B, T, 3 * C), block)
    logits, losses = randn(rng, N, V, scale=3.0), np.empty(N, np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    gpu().launch("crossentropy_forward", grid_rows(N), block, losses, logits, logits, targets, N, V, V)
    total = emulated_sum("sum_squares_partial", randn(rng, 20011), block)
    return [*ln, dinp, out, att, logits, losses, np.array(total)]


@covers("layernorm_forward", "layernorm_backward_dinp", "softmax_causal_forward",
        "crossentropy_forward", "sum_squares_partial", "sum_doubles")
def test_emulated_reductions_are_bitwise_identical_run_to_run():
    first, second = run_reductions(5, 32), run_reductions(5, 32)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
