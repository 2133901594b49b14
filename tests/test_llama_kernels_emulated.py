"""The cuda backend's Llama ops (kernels/rmsnorm.cu, rope.cu, swiglu.cu, grouped-query attention in
attention.cu, the encoder without position embeddings, nn.Linear products), run on the CPU under
emulation (tests/emu) against the cpu backend's ops.

fp32: every kernel of the Llama files against the cpu op at blocks that do not divide the sizes,
within TOL (float32 in another order); then the backend's host code (EmulatedCudaBackend: launch
geometry, the [B, KV, g*T, hd] views of grouped-query attention, cuBLAS or cuBLASLt products with
and without the bias epilogue, dw=None) against the cpu backend.
bf16, the conventions of tests/test_kernels_bf16_emulated.py: each `_bf16` kernel bit for bit its
fp32 twin on the widened inputs rounded once (`launch_twins`), and against the cpu op on the
widened inputs: elementwise within 1 bf16 ulp, rows within one rounding (TOL_ROUND), float32
outputs (rstd, dw) within TOL_F32, pipelines with bf16 products within TOL_PIPELINE.
Shapes are tiny (the emulator runs a fiber per CUDA thread): B = 2, T = 5, hd = 8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from compare import rel_err
from crystal.backends.cpu import CpuBackend
from crystal.backends.kernels import KERNELS, grid_1d, grid_rows
from cudnn_standin import CudnnStandIn
from emu.backend import EmulatedCudaBackend
from emu.build import parse_global_kernels
from emu.coverage import LLAMA_FILES, Coverage, gpu, launch_column_sums
from lt_standin import DescAttr, Epi, LayoutAttr, LtStandIn
from test_kernels_bf16_emulated import (TOL_F32, TOL_PIPELINE, TOL_ROUND, assert_within_ulp, bits, launch_twins,
                                        nan_bf16, randbf, to_bf16, widen)

B, T, NH, KV, HD = 2, 5, 4, 2, 8  # g = 2 query heads per kv head
W = (NH + 2 * KV) * HD  # qkv width
C = 40  # RMSNorm width: not a multiple of 32
I = 12  # SwiGLU width
N = B * T
EPS = 1e-5
TOL = 1e-5
BLOCKS = [32, 64]

be = CpuBackend()
COVERAGE = Coverage()
COVERED, covers = COVERAGE.covered, COVERAGE.covers


@pytest.fixture
def rng():
    return np.random.default_rng(2929)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def rope_table(T_: int, hd: int, theta: float = 10000.0):
    """cos, sin float32 [T, hd/2] of Hugging Face's rotary embedding (inv_freq = theta^(-2d/hd))."""
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T_, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def cpu(op: str, *args, **kwargs):
    """Runs the cpu backend's op on float32 copies of args (bf16 widened); returns the copies."""
    copies = [widen(a) if isinstance(a, np.ndarray) and a.dtype.itemsize == 2 else
              a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(be, op)(*copies, **kwargs)
    return copies


# --- the kernel set ---------------------------------------------------------------------------

def test_llama_every_kernel_of_the_llama_files_is_exercised_here():
    """(the changed attention.cu and encoder.cu kernels: here and tests/test_kernels_*emulated.py)"""
    llama = {n for n, f in parse_global_kernels().items() if f in LLAMA_FILES}
    assert llama == {n for n, k in KERNELS.items() if k.file in LLAMA_FILES}
    assert set(COVERED) >= llama


def test_llama_bf16_twins_have_the_fp32_kernels_file_and_argument_kinds():
    for name in (n for n, k in KERNELS.items() if k.file in LLAMA_FILES and n.endswith("_bf16")):
        assert (KERNELS[name].file, KERNELS[name].args) == (KERNELS[name[:-5]].file, KERNELS[name[:-5]].args)


# --- RMSNorm (fp32) ---------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("rmsnorm_forward", "residual_rmsnorm_forward")
def test_rmsnorm_forward_emulated_matches_cpu(rng, block):
    a, b, w = randn(rng, N, C, scale=2.0), randn(rng, N, C), randn(rng, C)
    inp = a + b
    out, rstd = np.full((N, C), np.nan, np.float32), np.full(N, np.nan, np.float32)
    gpu().launch("rmsnorm_forward", grid_rows(N), block, out, rstd, inp, w, N, C, EPS)
    e_out, e_rstd = cpu("rmsnorm_forward", np.empty((N, C), np.float32), np.empty(N, np.float32), inp, w, EPS)[:2]
    assert rel_err(out, e_out) <= TOL and rel_err(rstd, e_rstd) <= TOL
    # fused: residual then rmsnorm of the stored sum, bit for bit the two kernels; res may alias a
    res, fout, frstd = a.copy(), np.full((N, C), np.nan, np.float32), np.full(N, np.nan, np.float32)
    gpu().launch("residual_rmsnorm_forward", grid_rows(N), block, res, fout, frstd, res, b, w, N, C, EPS)
    assert res.tobytes() == inp.tobytes() and fout.tobytes() == out.tobytes() and frstd.tobytes() == rstd.tobytes()


@pytest.mark.parametrize("block, rows, cols", [(32, N, C), (64, 131, 7)])  # 131 rows: 3 column-sum parts
@covers("rmsnorm_backward_dinp", "rmsnorm_backward_dw_partial", "rmsnorm_backward_dw_sum")
def test_rmsnorm_backward_emulated_matches_cpu(rng, block, rows, cols):
    inp, w, dout, dinp_before = randn(rng, rows, cols, scale=2.0), randn(rng, cols), randn(rng, rows, cols), \
        randn(rng, rows, cols)
    rstd = cpu("rmsnorm_forward", np.empty((rows, cols), np.float32), np.empty(rows, np.float32), inp, w, EPS)[1]
    e_dinp, e_dw = cpu("rmsnorm_backward", dinp_before, np.empty(cols, np.float32), dout, inp, w, rstd)[:2]
    dinp, dw = dinp_before.copy(), np.full(cols, np.nan, np.float32)  # dinp accumulates, dw is written
    gpu().launch("rmsnorm_backward_dinp", grid_rows(rows), block, dinp, dout, inp, w, rstd, rows, cols)
    launch_column_sums("rmsnorm_backward_dw", block, (dw,), (dout, inp, rstd), rows, cols)
    assert rel_err(dinp, e_dinp) <= TOL and rel_err(dw, e_dw) <= TOL


# --- rotary embeddings (fp32) -----------------------------------------------------------------

@pytest.mark.parametrize("block, kv", [(32, KV), (64, 1)])  # grouped and multi-query
@covers("rope_forward", "rope_backward")
def test_rope_forward_and_backward_emulated_match_cpu(rng, block, kv):
    width = (NH + 2 * kv) * HD
    qkv, cos, sin = randn(rng, B, T, width), *rope_table(T + 3, HD)
    cos, sin = cos[:T], sin[:T]  # the caller's slice of a [block_size, hd/2] table
    n = B * T * (NH + kv) * HD // 2
    x = qkv.copy()
    gpu().launch("rope_forward", grid_1d(n, block), block, x, cos, sin, B, T, NH, kv, HD)
    expected = cpu("rope_forward", qkv, cos, sin, NH, kv)[0]
    assert rel_err(x, expected) <= TOL
    assert x[..., (NH + kv) * HD:].tobytes() == qkv[..., (NH + kv) * HD:].tobytes()  # v untouched
    dx = qkv.copy()
    gpu().launch("rope_backward", grid_1d(n, block), block, dx, cos, sin, B, T, NH, kv, HD)
    assert rel_err(dx, cpu("rope_backward", qkv, cos, sin, NH, kv)[0]) <= TOL
    # the backward is the forward's transpose: <rope(x), y> = <x, rope^T(y)>
    y = randn(rng, B, T, width)
    ry = y.copy()
    gpu().launch("rope_backward", grid_1d(n, block), block, ry, cos, sin, B, T, NH, kv, HD)
    assert abs(float(np.vdot(x.astype(np.float64), y)) - float(np.vdot(qkv.astype(np.float64), ry))) <= 1e-4


# --- SwiGLU (fp32) ----------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("swiglu_forward", "swiglu_backward")
def test_swiglu_forward_and_backward_emulated_match_cpu(rng, block):
    gu, dout = randn(rng, N, 2 * I, scale=3.0), randn(rng, N, I)
    out, dgu = np.full((N, I), np.nan, np.float32), np.full((N, 2 * I), np.nan, np.float32)
    gpu().launch("swiglu_forward", grid_1d(N * I, block), block, out, gu, N, I)
    gpu().launch("swiglu_backward", grid_1d(N * I, block), block, dgu, gu, dout, N, I)
    assert rel_err(out, cpu("swiglu_forward", np.empty((N, I), np.float32), gu)[0]) <= TOL
    assert rel_err(dgu, cpu("swiglu_backward", np.empty((N, 2 * I), np.float32), gu, dout)[0]) <= TOL


# --- grouped-query attention, the layout kernels (fp32) ---------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("attention_permute", "attention_permute_backward")
def test_gqa_permutes_emulated_read_kv_heads_in_place_and_sum_the_group_in_order(rng, block):
    qkv = randn(rng, B, T, W)
    q, k, v = (np.full((B, h, T, HD), np.nan, np.float32) for h in (NH, KV, KV))
    gpu().launch("attention_permute", grid_1d(q.size, block), block, q, k, v, qkv, B, T, NH, KV, HD)
    heads = lambda x, h: x.reshape(B, T, h, HD).transpose(0, 2, 1, 3)  # noqa: E731
    np.testing.assert_array_equal(q, heads(qkv[..., :NH * HD], NH))
    np.testing.assert_array_equal(k, heads(qkv[..., NH * HD:(NH + KV) * HD], KV))  # KV heads, not NH
    np.testing.assert_array_equal(v, heads(qkv[..., (NH + KV) * HD:], KV))
    dq, dk, dv = (randn(rng, B, NH, T, HD) for _ in range(3))  # dk, dv per query head
    dqkv = np.full((B, T, W), np.nan, np.float32)
    gpu().launch("attention_permute_backward", grid_1d(dq.size, block), block, dqkv, dq, dk, dv, B, T, NH, KV, HD)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, -1)  # noqa: E731
    assert dqkv.tobytes() == np.concatenate([flat(dq), flat(group_sum(dk)), flat(group_sum(dv))], -1).tobytes()


def group_sum(d):
    """d[B, NH, T, hd] (per query head) summed over each kv head's g query heads in ascending h, in
    float32: [B, KV, T, hd]."""
    per_kv = d.reshape(d.shape[0], KV, NH // KV, *d.shape[2:])
    s = per_kv[:, :, 0].copy()
    for j in range(1, NH // KV):
        s += per_kv[:, :, j]
    return s


# --- the backend's host code (fp32): launch geometry, views, products -------------------------

@pytest.fixture(scope="module")
def fp32():
    return EmulatedCudaBackend()


@pytest.mark.parametrize("kv, drop", [(KV, None), (1, None), (NH, None), (KV, (77, 1 << 30, 4.0 / 3.0))])
def test_gqa_attention_backend_emulated_matches_cpu(rng, fp32, kv, drop):
    """Grouped (g = 2), multi-query (g = 4) and GPT-2's multi-head attention, one with dropout on the
    probabilities: the products on [B, KV, g*T, hd] views against k, v [B, KV, T, hd]."""
    width = (NH + 2 * kv) * HD
    qkv, dout = randn(rng, B, T, width), randn(rng, B, T, NH * HD)
    shape, dtype = fp32.attention_saved(B, NH, T, HD)
    out, att = np.full((B, T, NH * HD), np.nan, np.float32), np.full(shape, np.nan, dtype)
    fp32.attention_forward(out, att, qkv, NH, drop, n_kv_head=kv)
    e_out, e_att = cpu("attention_forward", np.empty_like(out), np.empty(shape, dtype), qkv, NH, drop, n_kv_head=kv)[:2]
    assert rel_err(out, e_out) <= TOL and rel_err(att, e_att) <= TOL
    dqkv = np.full_like(qkv, np.nan)
    fp32.attention_backward(dqkv, dout, qkv, att, NH, drop, out=out, n_kv_head=kv)
    expected = cpu("attention_backward", np.empty_like(qkv), dout, qkv, e_att, NH, drop, out=e_out, n_kv_head=kv)[0]
    assert rel_err(dqkv, expected) <= TOL


@pytest.mark.parametrize("graphs", [False, True])  # cuBLAS (numpy standing in), or cuBLASLt (its stand-in)
@pytest.mark.parametrize("bias, frozen", [(True, False), (False, False), (True, True)])
def test_linear_backend_emulated_matches_cpu(rng, graphs, bias, frozen):
    """nn.Linear products: out = inp w^T (+ bias: cuBLASLt's BIAS epilogue, none without a bias),
    dinp = dout w, dw = dout^T inp with dbias from its BGRADB epilogue; dw None: no weight product."""
    gpu_ = EmulatedCudaBackend(graphs=graphs)
    OC = 24
    inp, w, dout = randn(rng, B, T, C), randn(rng, OC, C), randn(rng, B, T, OC)
    b = randn(rng, OC) if bias else None
    out = np.full((B, T, OC), np.nan, np.float32)
    gpu_.linear_forward(out, inp, w, b)
    assert rel_err(out, cpu("linear_forward", np.empty_like(out), inp, w, b)[0]) <= TOL
    assert not graphs or last_epilogue(gpu_) == (Epi.BIAS if bias else Epi.DEFAULT)
    dinp, dw = np.full_like(inp, np.nan), None if frozen else np.full_like(w, np.nan)
    dbias = np.full(OC, np.nan, np.float32) if bias else None
    gpu_.linear_backward(dinp, dw, dbias, dout, inp, w)
    e = cpu("linear_backward", np.empty_like(inp), None if frozen else np.empty_like(w),
            np.empty(OC, np.float32) if bias else None, dout, inp, w)
    assert rel_err(dinp, e[0]) <= TOL
    assert frozen or rel_err(dw, e[1]) <= TOL
    assert not bias or rel_err(dbias, e[2]) <= TOL
    # the bias gradient comes from the weight product's epilogue (the last product), or, without a
    # weight product, from the column sums
    assert not graphs or last_epilogue(gpu_) == (Epi.BGRADB if bias and not frozen else Epi.DEFAULT)


def last_epilogue(backend):
    """The epilogue of the last cuBLASLt product the backend's stand-in ran."""
    return backend._lt_bindings.last_matmul["desc"][DescAttr.EPILOGUE]


@pytest.mark.parametrize("graphs", [False, True])
def test_matmul_backward_without_dw_emulated_writes_dinp_and_dbias_only(rng, graphs):
    gpu_ = EmulatedCudaBackend(graphs=graphs)
    OC = 24
    inp, w, dout = randn(rng, N, C), randn(rng, C, OC), randn(rng, N, OC)
    dinp, dbias = np.full_like(inp, np.nan), np.full(OC, np.nan, np.float32)
    gpu_.matmul_backward(dinp, None, dbias, dout, inp, w)
    e = cpu("matmul_backward", np.empty_like(inp), np.empty_like(w), np.empty(OC, np.float32), dout, inp, w)
    assert rel_err(dinp, e[0]) <= TOL and rel_err(dbias, e[2]) <= TOL


def test_encoder_without_position_embeddings_backend_emulated_matches_cpu(rng, fp32):
    V = 37
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx[1, :3] = idx[0, 1]  # a repeated token
    wte, dout = randn(rng, V, C), randn(rng, B, T, C)
    out = np.full((B, T, C), np.nan, np.float32)
    fp32.encoder_forward(out, idx, wte, None)
    assert out.tobytes() == wte[idx].tobytes()  # the rows themselves
    dwte = randn(rng, V, C)  # += the scatter
    e_dwte = cpu("encoder_backward", dwte, None, dout, idx)[0]
    fp32.encoder_backward(dwte, None, dout, idx)
    assert rel_err(dwte, e_dwte) <= TOL


def test_rmsnorm_rope_swiglu_backend_emulated_match_cpu(rng, fp32):
    a, b, w, dout = randn(rng, B, T, C), randn(rng, B, T, C), randn(rng, C), randn(rng, B, T, C)
    res, out, rstd = np.empty_like(a), np.empty_like(a), np.empty((B, T), np.float32)
    fp32.residual_rmsnorm_forward(res, out, rstd, a, b, w, EPS)
    e_res, e_out, e_rstd = cpu("residual_rmsnorm_forward", np.empty_like(a), np.empty_like(a),
                               np.empty((B, T), np.float32), a, b, w, EPS)[:3]
    assert rel_err(res, e_res) <= TOL and rel_err(out, e_out) <= TOL and rel_err(rstd, e_rstd) <= TOL
    dinp, dw = np.ones_like(a), np.full(C, np.nan, np.float32)
    fp32.rmsnorm_backward(dinp, dw, dout, res, w, rstd)
    e_dinp, e_dw = cpu("rmsnorm_backward", np.ones_like(a), np.empty(C, np.float32), dout, res, w, rstd)[:2]
    assert rel_err(dinp, e_dinp) <= TOL and rel_err(dw, e_dw) <= TOL
    frozen = np.ones_like(a)
    fp32.rmsnorm_backward(frozen, None, dout, res, w, rstd)  # a frozen weight: dinp only
    assert frozen.tobytes() == dinp.tobytes()

    qkv, (cos, sin) = randn(rng, B, T, W), rope_table(T, HD)
    x = qkv.copy()
    fp32.rope_forward(x, cos, sin, NH, KV)
    assert rel_err(x, cpu("rope_forward", qkv, cos, sin, NH, KV)[0]) <= TOL
    fp32.rope_backward(x, cos, sin, NH, KV)
    assert rel_err(x, qkv) <= 1e-6  # a rotation: the transpose undoes it

    gu, dy = randn(rng, B, T, 2 * I, scale=2.0), randn(rng, B, T, I)
    y, dgu = np.empty((B, T, I), np.float32), np.empty((B, T, 2 * I), np.float32)
    fp32.swiglu_forward(y, gu)
    fp32.swiglu_backward(dgu, gu, dy)
    assert rel_err(y, cpu("swiglu_forward", np.empty_like(y), gu)[0]) <= TOL
    assert rel_err(dgu, cpu("swiglu_backward", np.empty_like(dgu), gu, dy)[0]) <= TOL


# --- bf16: each twin its fp32 kernel rounded once, and the cpu op on widened inputs -----------

@pytest.mark.parametrize("block", BLOCKS)
@covers("rmsnorm_forward_bf16", "residual_rmsnorm_forward_bf16", "rmsnorm_backward_dinp_bf16",
        "rmsnorm_backward_dw_partial_bf16", "rmsnorm_backward_dw_sum")
def test_rmsnorm_bf16_emulated(rng, block):
    a, b, w, dout = randbf(rng, N, C, scale=2.0), randbf(rng, N, C), randbf(rng, C), randbf(rng, N, C)
    res, out, rstd = nan_bf16(N, C), nan_bf16(N, C), np.full(N, np.nan, np.float32)
    launch_twins("rmsnorm_forward", grid_rows(N), block, out, rstd, a, w, N, C, EPS)
    e_out, e_rstd = cpu("rmsnorm_forward", np.empty((N, C), np.float32), np.empty(N, np.float32), a, w, EPS)[:2]
    assert rel_err(widen(out), e_out) <= TOL_ROUND and rel_err(rstd, e_rstd) <= TOL_F32
    # fused: bit for bit residual_forward_bf16 (one rounded add) then rmsnorm_forward_bf16 of the stored sum
    gpu().launch("residual_forward_bf16", grid_1d(N * C, block), block, res, a, b, N * C)
    assert_within_ulp(res, widen(a) + widen(b), 0)
    gpu().launch("rmsnorm_forward_bf16", grid_rows(N), block, out, rstd, res, w, N, C, EPS)
    fres, fout, frstd = nan_bf16(N, C), nan_bf16(N, C), np.full(N, np.nan, np.float32)
    gpu().launch("residual_rmsnorm_forward_bf16", grid_rows(N), block, fres, fout, frstd, a, b, w, N, C, EPS)
    assert [bits(fres).tobytes(), bits(fout).tobytes(), frstd.tobytes()] == \
        [bits(res).tobytes(), bits(out).tobytes(), rstd.tobytes()]

    dinp, dw = randbf(rng, N, C), np.full(C, np.nan, np.float32)
    e_dinp, e_dw = cpu("rmsnorm_backward", dinp, np.empty(C, np.float32), dout, res, w, rstd)[:2]
    launch_twins("rmsnorm_backward_dinp", grid_rows(N), block, dinp, dout, res, w, rstd, N, C)
    launch_column_sums("rmsnorm_backward_dw", block, (dw,), (dout, res, rstd), N, C, launch_partial=launch_twins)
    assert rel_err(widen(dinp), e_dinp) <= TOL_ROUND and rel_err(dw, e_dw) <= TOL_F32


@pytest.mark.parametrize("block", BLOCKS)
@covers("rope_forward_bf16", "rope_backward_bf16", "swiglu_forward_bf16", "swiglu_backward_bf16")
def test_rope_and_swiglu_bf16_emulated(rng, block):
    qkv, (cos, sin) = randbf(rng, B, T, W), rope_table(T, HD)
    n = B * T * (NH + KV) * HD // 2
    for kernel in ("rope_forward", "rope_backward"):
        x = qkv.copy()
        launch_twins(kernel, grid_1d(n, block), block, x, cos, sin, B, T, NH, KV, HD)
        assert_within_ulp(x, cpu(kernel, qkv, cos, sin, NH, KV)[0])
    gu, dout = randbf(rng, N, 2 * I, scale=3.0), randbf(rng, N, I)
    out, dgu = nan_bf16(N, I), nan_bf16(N, 2 * I)
    launch_twins("swiglu_forward", grid_1d(N * I, block), block, out, gu, N, I)
    launch_twins("swiglu_backward", grid_1d(N * I, block), block, dgu, gu, dout, N, I)
    assert_within_ulp(out, cpu("swiglu_forward", np.empty((N, I), np.float32), gu)[0])
    assert_within_ulp(dgu, cpu("swiglu_backward", np.empty((N, 2 * I), np.float32), gu, dout)[0])


@covers("attention_permute_bf16", "attention_permute_backward_bf16")
def test_gqa_permutes_bf16_emulated_twins(rng):
    qkv = randbf(rng, B, T, W)
    q, k, v = (nan_bf16(B, h, T, HD) for h in (NH, KV, KV))
    launch_twins("attention_permute", grid_1d(q.size, 32), 32, q, k, v, qkv, B, T, NH, KV, HD)
    dq, dk, dv = (randbf(rng, B, NH, T, HD) for _ in range(3))
    dqkv = nan_bf16(B, T, W)
    launch_twins("attention_permute_backward", grid_1d(dq.size, 32), 32, dqkv, dq, dk, dv, B, T, NH, KV, HD)
    assert bits(dqkv[..., NH * HD:(NH + KV) * HD]).tobytes() == \
        bits(to_bf16(group_sum(widen(dk)).transpose(0, 2, 1, 3).reshape(B, T, -1))).tobytes()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("flash, kv", [(False, KV), (True, KV), (True, 1)])  # cuBLASLt + softmax, or cuDNN's stand-in
def test_gqa_attention_bf16_backend_emulated_matches_cpu(rng, flash, kv):
    gpu_ = EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn() if flash else None)
    assert gpu_.flash == flash
    qkv, dout = randbf(rng, B, T, (NH + 2 * kv) * HD), randbf(rng, B, T, NH * HD)
    shape, dtype = gpu_.attention_saved(B, NH, T, HD)
    out, att = nan_bf16(B, T, NH * HD), np.full(shape, np.nan, dtype)
    gpu_.attention_forward(out, att, qkv, NH, n_kv_head=kv)
    e_out, e_att = cpu("attention_forward", np.empty((B, T, NH * HD), np.float32), np.empty((B, NH, T, T), np.float32),
                       qkv, NH, n_kv_head=kv)[:2]
    assert rel_err(widen(out), e_out) <= TOL_PIPELINE
    dqkv = nan_bf16(*qkv.shape)
    gpu_.attention_backward(dqkv, dout, qkv, att, NH, out=out, n_kv_head=kv)
    expected = cpu("attention_backward", np.empty(qkv.shape, np.float32), dout, qkv, e_att, NH, n_kv_head=kv)[0]
    assert rel_err(widen(dqkv), expected) <= TOL_PIPELINE and cosine(widen(dqkv), expected) >= 0.99


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bf16_backend_emulated_matches_cpu(rng, bias):
    """cuBLASLt: bf16 products with float32 accumulation; dw and dbias (BGRADB) float32."""
    gpu_ = EmulatedCudaBackend("bf16", lt=LtStandIn())
    OC = 24
    inp, w, dout = randbf(rng, N, C), randbf(rng, OC, C), randbf(rng, N, OC)
    b = randbf(rng, OC) if bias else None
    out = nan_bf16(N, OC)
    gpu_.linear_forward(out, inp, w, b)
    assert_within_ulp(out, cpu("linear_forward", np.empty((N, OC), np.float32), inp, w, b)[0])
    dinp, dw, dbias = nan_bf16(N, C), np.full((OC, C), np.nan, np.float32), np.full(OC, np.nan, np.float32)
    gpu_.linear_backward(dinp, dw, dbias if bias else None, dout, inp, w)
    e = cpu("linear_backward", np.empty((N, C), np.float32), np.empty((OC, C), np.float32),
            np.empty(OC, np.float32) if bias else None, dout, inp, w)
    assert_within_ulp(dinp, e[0])
    assert rel_err(dw, e[1]) <= TOL_F32 and (not bias or rel_err(dbias, e[2]) <= TOL_F32)


# --- LoRA's B on a column block [lo, lo+OC) of a fused [N, W] product (matmul_columns_*) --------------

R, OC_COLS = 4, 12  # the adapter's rank; the block's width (a k_proj of the fused q|k|v of width W)
LOS = [0, NH * HD, W - OC_COLS]  # the block first, inside, last: q, k, v of q|k|v


def assert_columns_product(lt: LtStandIn, ld: int, beta: float) -> None:
    """The stand-in's last product read the block in place: D (and C) with ld = the fused width."""
    call = lt.last_matmul
    assert call["layouts"]["D"][LayoutAttr.LD] == ld and call["beta"] == beta


@pytest.mark.parametrize("graphs", [False, True])  # fp32: cuBLASLt either way (cupy has no beta, and copies a strided operand)
@pytest.mark.parametrize("lo", LOS)
def test_matmul_columns_backend_emulated_matches_cpu_in_place(rng, graphs, lo):
    """out[:, lo:lo+OC] += inp @ w on the block of out [N, W], every other column untouched;
    d = dout[:, lo:lo+OC] read in place: dinp = d w^T, dw = inp^T d."""
    gpu_ = EmulatedCudaBackend(graphs=graphs)
    inp, w, out, dout = randn(rng, B, T, R), randn(rng, R, OC_COLS), randn(rng, B, T, W), randn(rng, B, T, W)
    before = out.copy()
    gpu_.matmul_columns_forward(out, inp, w, lo)
    assert_columns_product(gpu_._lt_bindings, W, 1.0)
    expected = cpu("matmul_columns_forward", before, inp, w, lo)[0]
    assert rel_err(out, expected) <= TOL
    outside = np.ones(W, bool)
    outside[lo:lo + OC_COLS] = False
    assert out[..., outside].tobytes() == before[..., outside].tobytes()
    dout_before = dout.copy()
    dinp, dw = np.full_like(inp, np.nan), np.full_like(w, np.nan)
    gpu_.matmul_columns_backward(dinp, dw, dout, inp, w, lo)
    e = cpu("matmul_columns_backward", np.empty_like(inp), np.empty_like(w), dout, inp, w, lo)
    assert rel_err(dinp, e[0]) <= TOL and rel_err(dw, e[1]) <= TOL
    assert dout.tobytes() == dout_before.tobytes()
    assert gpu_._lt_bindings.last_matmul["layouts"]["A"][LayoutAttr.LD] == W  # dw = inp^T d: d is cuBLASLt's A, ld W


@pytest.mark.parametrize("lo", LOS)
def test_matmul_columns_bf16_backend_emulated_matches_cpu(rng, lo):
    """bf16 activations, fp32 math: the block is its old values plus the product rounded once (within
    1 ulp of the cpu op on the widened inputs), every other column's bits untouched; dinp bf16
    within 1 ulp, dw float32 (a gradient slot) within TOL_F32."""
    gpu_ = EmulatedCudaBackend("bf16", lt=LtStandIn())
    inp, w, out, dout = randbf(rng, N, R), randbf(rng, R, OC_COLS), randbf(rng, N, W), randbf(rng, N, W)
    before = out.copy()
    gpu_.matmul_columns_forward(out, inp, w, lo)
    assert_columns_product(gpu_._lt_bindings, W, 1.0)
    expected = cpu("matmul_columns_forward", before, inp, w, lo)[0]
    assert_within_ulp(out, expected)
    outside = np.ones(W, bool)
    outside[lo:lo + OC_COLS] = False
    assert bits(out[:, outside]).tobytes() == bits(before[:, outside]).tobytes()
    dinp, dw = nan_bf16(N, R), np.full((R, OC_COLS), np.nan, np.float32)
    gpu_.matmul_columns_backward(dinp, dw, dout, inp, w, lo)
    e = cpu("matmul_columns_backward", np.empty((N, R), np.float32), np.empty((R, OC_COLS), np.float32), dout, inp,
            w, lo)
    assert_within_ulp(dinp, e[0])
    assert rel_err(dw, e[1]) <= TOL_F32

