"""Every bf16 kernel (the `_bf16` twins of kernels/*.cu and cast_to_bf16), run on the CPU under
emulation (tests/emu), on odd shapes and blocks that do not divide them.

Inputs are bf16 arrays (ml_dtypes). Each kernel is checked two ways:
- against the cpu backend: the fp32 cpu op on the bf16 inputs widened to float32, its result
  rounded once to bf16. One float op on equal inputs: bitwise; elementwise math whose float
  rounding may differ (libm vs cpu_math): 1 bf16 ulp; rows whose float32 reductions run in
  another order: rel err <= 4e-3 (one bf16 rounding: <= 2^-8 relative); float32 outputs
  (parameter gradients, mean, rstd, losses) as the fp32 kernel tests; data movement bitwise.
- against its fp32 twin (`launch_twins`): the body is the same template, so on the widened inputs
  the fp32 kernel's result rounded once is the bf16 kernel's result, bit for bit, and float32
  outputs are equal.
Error measure of rel_err: max|actual - expected| / max|expected|.
"""

from __future__ import annotations

import hashlib
import math
import platform

import ml_dtypes
import numpy as np
import pytest

from crystal.backends import cpu
from crystal.backends.cpu import CpuBackend
from crystal.backends.kernels import KERNELS, cdiv, grid_1d, grid_rows
from emu.build import parse_global_kernels
from emu.coverage import LLAMA_FILES, Coverage, gpu, launch_column_sums
from compare import rel_err

B, T, C, NH, V = 2, 19, 48, 3, 131
HS = C // NH
N = B * T
TMAX = T + 3  # wpe has more positions than the batch uses
SCALE = 1.0 / math.sqrt(HS)
BLOCKS = [32, 64]  # 32 does not divide C=48, 3C or V; 64 leaves whole warps idle in some rows
TOL_F32 = 1e-5  # float32 outputs from bf16 inputs: only the reduction order differs from cpu
TOL_ROUND = 4e-3  # one bf16 rounding (<= 2^-8 relative: 8 significant bits) of float32 rows
TOL_PIPELINE = 1e-2  # attention with its products rounded to bf16 as cuBLAS would

BF16 = np.dtype(ml_dtypes.bfloat16)
# the fused kernels' bf16 names: tests/test_kernels_fused_emulated.py
FUSED_BF16 = {"residual_layernorm_forward_bf16", "crossentropy_forward_backward_bf16",
              "adamw_update_copy_bf16"}
# inference's kv_cache.cu: tests/test_kernels_kv_cache_emulated.py
KV_CACHE = {n for n, k in KERNELS.items() if k.file == "kv_cache.cu"}
# Llama's rmsnorm.cu, rope.cu, swiglu.cu: tests/test_llama_kernels_emulated.py
LLAMA = {n for n, k in KERNELS.items() if k.file in LLAMA_FILES}
BF16_KERNELS = {n for n in KERNELS if n.endswith("_bf16")} - FUSED_BF16 - KV_CACHE - LLAMA | {"cast_to_bf16"}

be = CpuBackend()
COVERAGE = Coverage()
COVERED, covers = COVERAGE.covered, COVERAGE.covers


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


# --- bf16 helpers -----------------------------------------------------------------------------

def to_bf16(x) -> np.ndarray:
    """Round to nearest even, as f32_to_bf16 (tests/test_emu_bf16.py checks they agree)."""
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(BF16))


def widen(h) -> np.ndarray:
    return h.astype(np.float32)


def randbf(rng, *shape, scale=1.0) -> np.ndarray:
    return to_bf16(rng.standard_normal(shape) * scale)


def nan_bf16(*shape) -> np.ndarray:
    """An output buffer that the kernel must overwrite everywhere."""
    return to_bf16(np.full(shape, np.nan, np.float32))


def bits(h) -> np.ndarray:
    return np.ascontiguousarray(h).view(np.uint16)


def ulps(a, b) -> int:
    """Largest distance between bf16 arrays a and b in units in the last place (across zero)."""
    def ordered(h):
        i = bits(h).astype(np.int32)
        return np.where(i & 0x8000, -(i & 0x7FFF), i)
    assert not np.isnan(widen(a)).any() and not np.isnan(widen(b)).any()
    return int(np.abs(ordered(a) - ordered(b)).max())


def assert_bitwise(actual, expected_f32):
    """actual (bf16) is expected_f32 rounded once, bit for bit."""
    np.testing.assert_array_equal(bits(actual), bits(to_bf16(expected_f32)))


def assert_within_ulp(actual, expected_f32, n=1):
    assert ulps(actual, to_bf16(expected_f32)) <= n


def launch_twins(name, grid, block, *args):
    """Launches `name`_bf16 on args and the fp32 `name` on float32 copies (bf16 arrays widened,
    aliases kept), then checks that every bf16 array is the fp32 run's rounded once and every
    other array equals the fp32 run's, bit for bit. Returns the fp32 run's arrays."""
    copies, twin = {}, []
    for a in args:
        if isinstance(a, np.ndarray):
            if id(a) not in copies:
                copies[id(a)] = widen(a) if a.dtype == BF16 else a.copy()
            twin.append(copies[id(a)])
        else:
            twin.append(a)
    gpu().launch(name + "_bf16", grid, block, *args)
    gpu().launch(name, grid, block, *twin)
    for i, (a, f) in enumerate(zip(args, twin)):
        if isinstance(a, np.ndarray):
            same = (np.array_equal(bits(a), bits(to_bf16(f))) if a.dtype == BF16
                    else a.tobytes() == f.tobytes())
            assert same, f"{name}_bf16 argument {i} differs from the fp32 kernel's"
    return twin


def token_buckets(idx):
    """Rows of idx grouped by token: (bucket_token, bucket_start[n+1], positions)."""
    flat = idx.reshape(-1)
    positions = np.argsort(flat, kind="stable").astype(np.int32)
    tokens, starts = np.unique(flat[positions], return_index=True)
    return (tokens.astype(np.int32), np.append(starts, flat.size).astype(np.int32), positions)


# --- the kernel set ---------------------------------------------------------------------------

def test_bf16_every_twin_has_the_fp32_kernels_file_and_argument_kinds():
    for name in BF16_KERNELS - {"cast_to_bf16"}:
        fp32 = KERNELS[name.removesuffix("_bf16")]
        assert (KERNELS[name].file, KERNELS[name].args) == (fp32.file, fp32.args), name
    assert KERNELS["cast_to_bf16"].args == ("ptr", "ptr", "i64")


def test_bf16_every_kernel_is_exercised_by_a_test():
    in_sources = {n for n in parse_global_kernels()
                  if n.endswith("_bf16") or n == "cast_to_bf16"} - FUSED_BF16 - KV_CACHE - LLAMA
    assert set(COVERED) == in_sources == BF16_KERNELS


# --- encoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("encoder_forward_bf16")
def test_encoder_forward_bf16_emulated(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = randbf(rng, V, C), randbf(rng, TMAX, C)
    out = nan_bf16(B, T, C)
    launch_twins("encoder_forward", grid_1d(N * C, block), block, out, idx, wte, wpe, N, T, C)
    expected = np.empty((B, T, C), np.float32)
    be.encoder_forward(expected, idx, widen(wte), widen(wpe))
    assert_bitwise(out, expected)  # one float add on equal inputs


@pytest.mark.parametrize("block", BLOCKS)
@covers("encoder_backward_wpe_bf16", "encoder_backward_wte_bf16")
def test_encoder_backward_bf16_emulated(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx[1, :5] = idx[0, 3]  # a token repeated across rows and batches
    dout = randbf(rng, B, T, C)
    dwte_head = rng.standard_normal((V, C)).astype(np.float32)  # float32, holds the head's grad
    e_dwte, e_dwpe = dwte_head.copy(), np.empty((TMAX, C), np.float32)
    be.encoder_backward(e_dwte, e_dwpe, widen(dout), idx)

    dwpe = np.full((TMAX, C), np.nan, np.float32)
    launch_twins("encoder_backward_wpe", grid_1d(TMAX * C, block), block, dwpe, dout, B, T, TMAX, C)
    dwte = dwte_head.copy()
    tokens, starts, positions = token_buckets(idx)
    launch_twins("encoder_backward_wte", (cdiv(C, block), tokens.size, 1), block, dwte, dout,
                 tokens, starts, positions, tokens.size, C)
    assert rel_err(dwpe, e_dwpe) <= TOL_F32
    assert rel_err(dwte, e_dwte) <= TOL_F32


# --- layernorm --------------------------------------------------------------------------------

def layernorm_inputs(rng):
    return to_bf16(rng.standard_normal((N, C)) * 2.0 + 0.5), randbf(rng, C), randbf(rng, C)


@pytest.mark.parametrize("block", BLOCKS)
@covers("layernorm_forward_bf16")
def test_layernorm_forward_bf16_emulated(rng, block):
    inp, w, b = layernorm_inputs(rng)
    out, mean, rstd = nan_bf16(N, C), np.empty(N, np.float32), np.empty(N, np.float32)
    launch_twins("layernorm_forward", grid_rows(N), block, out, mean, rstd, inp, w, b, N, C, 1e-5)
    e_out, e_mean, e_rstd = np.empty((N, C), np.float32), np.empty_like(mean), np.empty_like(rstd)
    be.layernorm_forward(e_out, e_mean, e_rstd, widen(inp), widen(w), widen(b), 1e-5)
    assert rel_err(widen(out), e_out) <= TOL_ROUND
    assert rel_err(mean, e_mean) <= TOL_F32
    assert rel_err(rstd, e_rstd) <= TOL_F32


@pytest.mark.parametrize("block", BLOCKS)
@covers("layernorm_backward_dinp_bf16", "layernorm_backward_dwdb_partial_bf16")
def test_layernorm_backward_bf16_emulated(rng, block):
    inp, w, b = layernorm_inputs(rng)
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    be.layernorm_forward(np.empty((N, C), np.float32), mean, rstd, widen(inp), widen(w), widen(b),
                         1e-5)
    dout, dinp_before = randbf(rng, N, C), randbf(rng, N, C)  # dinp accumulates
    e_dinp, e_dw, e_db = widen(dinp_before), np.empty(C, np.float32), np.empty(C, np.float32)
    be.layernorm_backward(e_dinp, e_dw, e_db, widen(dout), widen(inp), widen(w), mean, rstd)

    dinp = dinp_before.copy()
    dw, db = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)  # written
    launch_twins("layernorm_backward_dinp", grid_rows(N), block, dinp, dout, inp, w, mean, rstd,
                 N, C)
    launch_column_sums("layernorm_backward_dwdb", block, (dw, db), (dout, inp, mean, rstd), N, C,
                       launch_partial=launch_twins)
    assert rel_err(widen(dinp), e_dinp) <= TOL_ROUND
    assert rel_err(dw, e_dw) <= TOL_F32
    assert rel_err(db, e_db) <= TOL_F32


# --- matmul bias ------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("bias_forward_bf16", "bias_backward_partial_bf16")
def test_bias_forward_and_backward_bf16_emulated(rng, block):
    OC = 3 * C
    out, bias, dout = randbf(rng, N, OC), randbf(rng, OC), randbf(rng, N, OC)
    e_out, e_dbias = widen(out), np.empty(OC, np.float32)
    cpu.bias_forward(e_out, widen(bias))
    cpu.bias_backward(e_dbias, widen(dout))

    launch_twins("bias_forward", grid_1d(N * OC, block), block, out, bias, N, OC)
    dbias = np.full(OC, np.nan, np.float32)
    launch_column_sums("bias_backward", block, (dbias,), (dout,), N, OC, launch_partial=launch_twins)
    assert_bitwise(out, e_out)  # one float add on equal inputs
    assert rel_err(dbias, e_dbias) <= TOL_F32


# --- attention --------------------------------------------------------------------------------

def per_head():
    return nan_bf16(B, NH, T, HS)


def heads(x, width):
    """[B,T,width*C] -> [width,B,NH,T,HS]: the permutes' reference, by numpy reshapes."""
    return x.reshape(B, T, width, NH, HS).transpose(2, 0, 3, 1, 4)


@pytest.mark.parametrize("block", BLOCKS)
@covers("attention_permute_bf16", "attention_unpermute_bf16", "attention_unpermute_backward_bf16",
        "attention_permute_backward_bf16")
def test_attention_layout_bf16_emulated_moves_bits(rng, block):
    qkv, dout = randbf(rng, B, T, 3 * C), randbf(rng, B, T, C)
    qkv.view(np.uint16)[0, 0, :3] = [0x7FC1, 0xFF80, 0x0001]  # NaN payload, -inf, a subnormal
    n = B * NH * T * HS
    q, k, v = per_head(), per_head(), per_head()
    gpu().launch("attention_permute_bf16", grid_1d(n, block), block, q, k, v, qkv, B, T, NH, NH, HS)
    for got, want in zip((q, k, v), heads(qkv, 3)):
        np.testing.assert_array_equal(bits(got), bits(want))
    out = nan_bf16(B, T, C)
    gpu().launch("attention_unpermute_bf16", grid_1d(n, block), block, out, q, B, T, NH, HS)
    np.testing.assert_array_equal(bits(out), bits(qkv[:, :, :C]))  # unpermute(q) = q's channels
    dy = per_head()
    gpu().launch("attention_unpermute_backward_bf16", grid_1d(n, block), block, dy, dout,
                 B, T, NH, HS)
    np.testing.assert_array_equal(bits(dy), bits(heads(dout, 1)[0]))
    dqkv = nan_bf16(B, T, 3 * C)
    gpu().launch("attention_permute_backward_bf16", grid_1d(n, block), block, dqkv, q, k, v,
                 B, T, NH, NH, HS)
    np.testing.assert_array_equal(bits(dqkv), bits(qkv))  # the adjoint inverts the permute


def mm(a, b):
    """A cuBLAS product of bf16 operands: float32 accumulation, bf16 result."""
    return to_bf16(np.matmul(widen(a), widen(b)))


@pytest.mark.parametrize("block", BLOCKS)
@covers("attention_permute_bf16", "softmax_causal_forward_bf16", "attention_unpermute_bf16",
        "attention_unpermute_backward_bf16", "softmax_causal_backward_bf16",
        "attention_permute_backward_bf16")
def test_attention_bf16_emulated_pipeline_matches_cpu(rng, block):
    """The cuda backend's composition in bf16, numpy standing in for cuBLAS (products rounded to
    bf16), against the cpu backend's float32 attention on the widened inputs."""
    qkv, dout = randbf(rng, B, T, 3 * C), randbf(rng, B, T, C)
    n = B * NH * T * HS
    q, k, v = per_head(), per_head(), per_head()
    launch_twins("attention_permute", grid_1d(n, block), block, q, k, v, qkv, B, T, NH, NH, HS)
    att = mm(q, k.transpose(0, 1, 3, 2))
    launch_twins("softmax_causal_forward", grid_rows(B * NH * T), block, att, att, B * NH, T,
                 SCALE)
    out = nan_bf16(B, T, C)
    launch_twins("attention_unpermute", grid_1d(n, block), block, out, mm(att, v), B, T, NH, HS)
    e_out, e_att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    be.attention_forward(e_out, e_att, widen(qkv), NH)
    assert rel_err(widen(out), e_out) <= TOL_PIPELINE
    assert rel_err(widen(att), e_att) <= TOL_PIPELINE

    dy = per_head()
    launch_twins("attention_unpermute_backward", grid_1d(n, block), block, dy, dout, B, T, NH, HS)
    datt, dv = mm(dy, v.transpose(0, 1, 3, 2)), mm(att.transpose(0, 1, 3, 2), dy)
    launch_twins("softmax_causal_backward", grid_rows(B * NH * T), block, datt, datt, att,
                 B * NH, T, SCALE)
    dq, dk = mm(datt, k), mm(datt.transpose(0, 1, 3, 2), q)
    dqkv = nan_bf16(B, T, 3 * C)
    launch_twins("attention_permute_backward", grid_1d(n, block), block, dqkv, dq, dk, dv,
                 B, T, NH, NH, HS)
    expected = np.empty((B, T, 3 * C), np.float32)
    be.attention_backward(expected, widen(dout), widen(qkv), widen(att), NH)
    assert rel_err(widen(dqkv), expected) <= TOL_PIPELINE


def cpu_softmax_rows(preatt):
    """cpu's causal softmax of each [T,T] head of preatt (float32 copy, in place)."""
    att = np.ascontiguousarray(preatt, np.float32).copy()
    for head in att.reshape(-1, T * T):
        cpu.softmax_causal_rows(head, T, np.float32(SCALE))
    return att


def cpu_softmax_rows_backward(datt, att):
    d = np.ascontiguousarray(datt, np.float32).copy()
    for dh, ah in zip(d.reshape(-1, T * T), np.ascontiguousarray(att).reshape(-1, T * T)):
        cpu.softmax_causal_rows_backward(dh, ah, T, np.float32(SCALE))
    return d


@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("softmax_causal_forward_bf16", "softmax_causal_backward_bf16")
def test_causal_softmax_bf16_emulated_matches_cpu(rng, block, in_place):
    BNH = 2
    preatt, datt = randbf(rng, BNH, T, T, scale=3.0), randbf(rng, BNH, T, T)
    e_att = cpu_softmax_rows(widen(preatt))
    att = preatt.copy() if in_place else nan_bf16(BNH, T, T)
    launch_twins("softmax_causal_forward", grid_rows(BNH * T), block, att,
                 att if in_place else preatt, BNH, T, SCALE)
    assert_within_ulp(att, e_att)
    causal = np.tril(np.ones((T, T), bool))
    assert np.all(bits(att)[:, ~causal] == 0)  # +0 above the diagonal

    e_dpre = cpu_softmax_rows_backward(widen(datt), widen(att))
    dpre = datt.copy() if in_place else nan_bf16(BNH, T, T)
    launch_twins("softmax_causal_backward", grid_rows(BNH * T), block, dpre,
                 dpre if in_place else datt, att, BNH, T, SCALE)
    assert rel_err(widen(dpre), e_dpre) <= TOL_ROUND
    assert np.all(bits(dpre)[:, ~causal] == 0)


# --- gelu, residual, dropout ------------------------------------------------------------------

@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("gelu_forward_bf16", "gelu_backward_bf16")
def test_gelu_forward_and_backward_bf16_emulated(rng, block, in_place):
    n = N * 4 * C
    inp, dout = randbf(rng, n, scale=2.0), randbf(rng, n)
    out = nan_bf16(n)
    launch_twins("gelu_forward", grid_1d(n, block), block, out, inp, n)
    dinp = dout.copy() if in_place else nan_bf16(n)
    launch_twins("gelu_backward", grid_1d(n, block), block, dinp, inp,
                 dinp if in_place else dout, n)  # in place: dinp aliases dout
    e_out, e_dinp = np.empty(n, np.float32), np.empty(n, np.float32)
    be.gelu_forward(e_out, widen(inp))
    be.gelu_backward(e_dinp, widen(inp), widen(dout))
    assert_within_ulp(out, e_out)  # tanhf: libm here, cpu_math's there
    assert_within_ulp(dinp, e_dinp)


@pytest.mark.parametrize("block", BLOCKS)
@covers("residual_forward_bf16")
def test_residual_forward_bf16_emulated(rng, block):
    n = N * C
    a, b = randbf(rng, n), randbf(rng, n)
    out = nan_bf16(n)
    launch_twins("residual_forward", grid_1d(n, block), block, out, a, b, n)
    expected = np.empty(n, np.float32)
    be.residual_forward(expected, widen(a), widen(b))
    assert_bitwise(out, expected)  # one float add on equal inputs


@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("dropout_bf16")
def test_dropout_bf16_emulated_drops_the_elements_the_cpu_drops(rng, block, in_place):
    from crystal.dropout import Dropout

    n = N * C + 7
    d = Dropout(0.3, 11, 4, 2)
    key = d.key(1, 2)
    inp = randbf(rng, n)
    out = inp.copy() if in_place else nan_bf16(n)
    launch_twins("dropout", grid_1d(n, block), block, out, out if in_place else inp,
                 np.array([key], np.int64), 0, d.threshold, d.scale, n)
    expected = np.empty(n, np.float32)
    be.dropout(expected, widen(inp), key, d.threshold, d.scale)
    assert_bitwise(out, expected)  # the same mask, one float multiply


# --- cross-entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("crossentropy_forward_bf16", "crossentropy_backward_bf16")
def test_crossentropy_forward_and_backward_bf16_emulated(rng, block, in_place):
    VP = 192  # V = 131 logits a row, then the LM head's padding columns: ignored, written 0
    logits, targets = randbf(rng, N, VP, scale=3.0), rng.integers(0, V, N).astype(np.int32)
    targets[:3] = [0, V - 1, 1]  # both ends of the vocabulary
    dloss = 1.0 / N
    e_losses, e_probs = np.empty(N, np.float32), np.empty((N, VP), np.float32)
    be.crossentropy_forward(e_losses, e_probs, widen(logits), targets, V)

    # in place: probs alias logits, then dlogits alias probs
    losses = np.full(N, np.nan, np.float32)
    probs = logits if in_place else nan_bf16(N, VP)
    launch_twins("crossentropy_forward", grid_rows(N), block, losses, probs, logits, targets, N, V, VP)
    assert rel_err(losses, e_losses) <= TOL_F32
    assert_within_ulp(probs, e_probs)

    e_dlogits = np.empty((N, VP), np.float32)
    be.crossentropy_backward(e_dlogits, widen(probs), targets, dloss, V)
    dlogits = probs if in_place else nan_bf16(N, VP)
    launch_twins("crossentropy_backward", grid_1d(N * VP, block), block, dlogits, probs, targets,
                 N, V, VP, dloss)
    assert_bitwise(dlogits, e_dlogits)  # p*dloss (- dloss at the target): the same float ops
    assert not widen(dlogits)[:, V:].any()


# --- the weight cast --------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("cast_to_bf16")
def test_cast_to_bf16_emulated_rounds_to_nearest_even(rng, block):
    edges = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF,
                      0x7F7F0000, 0x7F7F8000, 0x00000001, 0x00018000, 0x007FFFFF, 0x80000000,
                      0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC0DEAD, 0x7F80FFFF],
                     np.uint32).view(np.float32)
    x = np.concatenate([rng.standard_normal(1001).astype(np.float32), edges])
    out = np.full(x.size, 0xAAAA, np.uint16).view(BF16)
    gpu().launch("cast_to_bf16", grid_1d(x.size, block), block, out, x, x.size)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.where(np.isnan(x), np.uint16(0x7FFF), bits(to_bf16(x)))  # CUDA's NaN: 0x7FFF
    np.testing.assert_array_equal(bits(out), want)


# --- the largest block ------------------------------------------------------------------------

@covers("layernorm_forward_bf16", "softmax_causal_forward_bf16", "crossentropy_forward_bf16")
def test_bf16_row_kernels_emulated_with_1024_threads_per_block(rng):
    block, rows, t = 1024, 3, 5  # 32 warps; few rows, since each row is a block of 1024 threads
    inp, w, b = randbf(rng, rows, C), randbf(rng, C), randbf(rng, C)
    out, mean, rstd = nan_bf16(rows, C), np.empty(rows, np.float32), np.empty(rows, np.float32)
    launch_twins("layernorm_forward", grid_rows(rows), block, out, mean, rstd, inp, w, b, rows, C,
                 1e-5)
    preatt = randbf(rng, 1, t, t)
    att = nan_bf16(1, t, t)
    launch_twins("softmax_causal_forward", grid_rows(t), block, att, preatt, 1, t, 1.0)
    logits, targets = randbf(rng, rows, 2 * block + 7), np.array([0, 5, 2 * block + 6], np.int32)
    losses, probs = np.empty(rows, np.float32), nan_bf16(*logits.shape)
    launch_twins("crossentropy_forward", grid_rows(rows), block, losses, probs, logits, targets,
                 rows, logits.shape[1], logits.shape[1])
    e_losses, e_probs = np.empty_like(losses), np.empty(logits.shape, np.float32)
    be.crossentropy_forward(e_losses, e_probs, widen(logits), targets)
    assert rel_err(losses, e_losses) <= TOL_F32
    assert_within_ulp(probs, e_probs)


# --- the fp32 kernels did not change ----------------------------------------------------------

def lcg_floats(n, salt):
    """n float32 in [-2, 2) from a fixed integer hash (no RNG stream that a numpy release could
    change)."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(salt) * np.uint64(1 << 32)
    z = i * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    z ^= z >> np.uint64(29)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(32)
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0 ** 22 - 2.0).astype(np.float32)


def fp32_outputs(block):
    """Outputs of the fp32 kernels that use only + - * / sqrt (IEEE: the same on any x86-64)."""
    gpu_ = gpu()
    f = lambda salt, *shape: lcg_floats(int(np.prod(shape)), salt).reshape(shape)
    idx = (np.abs(lcg_floats(N, 1)) * 1000).astype(np.int32) % V
    wte, wpe = f(2, V, C), f(3, TMAX, C)
    enc = np.empty((N, C), np.float32)
    gpu_.launch("encoder_forward", grid_1d(N * C, block), block, enc, idx, wte, wpe, N, T, C)
    dout = f(4, N, C)
    dwpe = np.empty((TMAX, C), np.float32)
    gpu_.launch("encoder_backward_wpe", grid_1d(TMAX * C, block), block, dwpe, dout, B, T, TMAX, C)
    tokens, starts, positions = token_buckets(idx)
    dwte = wte.copy()
    gpu_.launch("encoder_backward_wte", (cdiv(C, block), tokens.size, 1), block, dwte, dout,
                tokens, starts, positions, tokens.size, C)
    w, b = f(5, C), f(6, C)
    ln, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    gpu_.launch("layernorm_forward", grid_rows(N), block, ln, mean, rstd, enc, w, b, N, C, 1e-5)
    dinp = f(7, N, C)
    gpu_.launch("layernorm_backward_dinp", grid_rows(N), block, dinp, dout, enc, w, mean, rstd,
                N, C)
    dw, db = np.empty(C, np.float32), np.empty(C, np.float32)
    launch_column_sums("layernorm_backward_dwdb", block, (dw, db), (dout, enc, mean, rstd), N, C)
    qkv, bias = f(8, N, 3 * C), f(9, 3 * C)
    gpu_.launch("bias_forward", grid_1d(qkv.size, block), block, qkv, bias, N, 3 * C)
    dbias = np.empty(3 * C, np.float32)
    launch_column_sums("bias_backward", block, (dbias,), (qkv,), N, 3 * C)
    q, k, v = (np.empty((B, NH, T, HS), np.float32) for _ in range(3))
    n = q.size
    gpu_.launch("attention_permute", grid_1d(n, block), block, q, k, v, qkv, B, T, NH, NH, HS)
    y = np.empty((N, C), np.float32)
    gpu_.launch("attention_unpermute", grid_1d(n, block), block, y, q, B, T, NH, HS)
    dy = np.empty_like(q)
    gpu_.launch("attention_unpermute_backward", grid_1d(n, block), block, dy, dout, B, T, NH, HS)
    dqkv = np.empty_like(qkv)
    gpu_.launch("attention_permute_backward", grid_1d(n, block), block, dqkv, k, v, dy,
                B, T, NH, NH, HS)
    att = np.tril(np.abs(f(10, B * NH, T, T)))
    datt = f(11, B * NH, T, T)
    gpu_.launch("softmax_causal_backward", grid_rows(B * NH * T), block, datt, datt, att, B * NH,
                T, 0.25)
    res = np.empty(N * C, np.float32)
    gpu_.launch("residual_forward", grid_1d(N * C, block), block, res, ln, dinp, N * C)
    drop = np.empty(N * C, np.float32)
    gpu_.launch("dropout", grid_1d(N * C, block), block, drop, res, np.array([12345], np.int64), 0,
                1 << 31, 2.0, N * C)
    probs = np.abs(f(12, N, V))
    targets = (np.abs(lcg_floats(N, 13)) * 1000).astype(np.int32) % V
    dlogits = np.empty_like(probs)
    gpu_.launch("crossentropy_backward", grid_1d(N * V, block), block, dlogits, probs, targets,
                N, V, V, 1.0 / N)
    return [enc, dwpe, dwte, ln, mean, rstd, dinp, dw, db, qkv, dbias, q, k, v, y, dy, dqkv, datt,
            res, drop, dlogits]


# sha256 prefixes of fp32_outputs(block), recorded from the fp32 kernels before the bf16 twins
# were added (templating them must not change a bit).
FP32_DIGESTS = {32: "eb2a2c59455cd776ac7c71e70f0980c9", 64: "f4edd228dfcd6789dc0a4cc8bab19e2f"}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="digests recorded on x86-64 (elsewhere g++ may contract to FMA)")
@pytest.mark.parametrize("block", BLOCKS)
def test_fp32_kernels_emulated_results_are_unchanged(block):
    h = hashlib.sha256()
    for a in fp32_outputs(block):
        h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest()[:32] == FP32_DIGESTS[block]
