"""kernels/kv_cache.cu (inference, crystal.generate) under CPU emulation: each fp32 kernel matches
the cpu backend's inference op (crystal.backends.cpu_infer), and each `_bf16` twin is the fp32
kernel on the widened inputs with every stored value rounded once (its copies: bit for bit).

Shapes are odd (C=48 with blocks of 32 and 64, three heads, sequences at different positions)
and the caches start full of other values, so a kernel that writes or reads the wrong
position shows. Llama's shapes too: grouped-query attention (4 query heads on 2 KV heads, and on
1), the rotary rotation at each sequence's positions, the embedding without position embeddings.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.backends.cpu_infer import CpuInferenceOps
from crystal.backends.kernels import KERNELS, grid_1d, grid_rows
from emu.coverage import Coverage, gpu
from compare import rel_err

B, T, C, NH, V, CAP = 4, 5, 48, 3, 67, 17
HS = C // NH
HEADS = [(3, 3, 16), (4, 2, 12), (4, 1, 6)]  # (NH, KV, hd): GPT-2's MHA, GQA, MQA
# each sequence's first new position (12 + 5 == CAP); -1: the sequence sits out
POS = np.array([0, 7, -1, 12], dtype=np.int32)
ROWS = np.array([4, 0, 2, 1], dtype=np.int32)
BLOCKS = [32, 64]
TOL = 1e-5
BF16 = np.dtype(ml_dtypes.bfloat16)

ops = CpuInferenceOps(CpuBackend())
COVERAGE = Coverage()
COVERED, covers = COVERAGE.covered, COVERAGE.covers


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_every_kv_cache_kernel_is_exercised_by_a_test():
    assert set(COVERED) == {n for n, k in KERNELS.items() if k.file == "kv_cache.cu"}


@pytest.mark.parametrize("block", BLOCKS)
@covers("embed_at")
def test_embed_at_places_each_sequence_at_its_own_positions(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = randn(rng, V, C), randn(rng, CAP, C)
    out, expected = np.full((B, T, C), np.nan, np.float32), np.empty((B, T, C), np.float32)
    gpu().launch("embed_at", grid_1d(B * T * C, block), block, out, idx, wte, wpe, POS, B * T, T, C)
    ops.embed_at(expected, idx, wte, wpe, POS)
    assert np.array_equal(out, expected)
    gpu().launch("embed_at", grid_1d(B * T * C, block), block, out, idx, wte, None, POS, B * T, T, C)  # llama
    ops.embed_at(expected, idx, wte, None, POS)
    assert np.array_equal(out, expected) and np.array_equal(out, wte[idx])


def cos_sin(rng, hd):
    """A rotary table of CAP positions (random angles: any position read wrongly shows)."""
    angles = rng.uniform(-np.pi, np.pi, (CAP, hd // 2))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("heads", HEADS[1:])
@covers("rope_at")
def test_rope_at_rotates_each_token_by_its_sequences_position(rng, block, heads):
    nh, kv, hd = heads
    qkv, (cos, sin) = randn(rng, B, T, (nh + 2 * kv) * hd), cos_sin(rng, hd)
    out, expected = qkv.copy(), qkv.copy()
    gpu().launch("rope_at", grid_1d(B * T * (nh + kv) * hd // 2, block), block, out, cos, sin, POS, B, T, nh, kv,
                 hd)
    ops.rope_at(expected, cos, sin, POS, nh, kv)
    assert rel_err(out, expected) <= TOL
    assert np.array_equal(out[2], qkv[2]) and np.array_equal(out[..., (nh + kv) * hd:], qkv[..., (nh + kv) * hd:])
    # the training op at positions 0..T-1 is rope_at at pos 0
    train = qkv[:1].copy()
    CpuBackend().rope_forward(train, cos, sin, nh, kv)
    assert np.array_equal(train[0], expected[0])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("heads", HEADS)
@covers("kv_store", "kv_attention")
def test_kv_attention_stores_the_new_keys_and_attends_causally_to_the_cache(rng, block, heads):
    nh, kv, hd = heads
    qkv = randn(rng, B, T, (nh + 2 * kv) * hd)
    k0, v0 = randn(rng, B, kv, CAP, hd), randn(rng, B, kv, CAP, hd)  # earlier positions' keys, values
    k, v, out = k0.copy(), v0.copy(), np.full((B, T, nh * hd), np.nan, np.float32)
    scores = np.empty(B * nh * T * CAP, np.float32)
    gpu().launch("kv_store", grid_1d(B * T * kv * hd, block), block, k, v, qkv, POS, B, T, nh, kv, hd, CAP)
    gpu().launch("kv_attention", grid_rows(B * nh * T), block, out, qkv, k, v, scores, POS, B, T, nh, kv, hd, CAP,
                 1.0 / math.sqrt(hd))
    ek, ev, expected = k0.copy(), v0.copy(), np.empty((B, T, nh * hd), np.float32)
    ops.kv_attention(expected, qkv, ek, ev, POS, nh, kv)
    assert np.array_equal(k, ek) and np.array_equal(v, ev)
    assert rel_err(out, expected) <= TOL
    assert np.array_equal(k[2], k0[2]) and not out[2].any()  # the row that sat out


def test_cpu_gqa_kv_attention_is_attention_with_each_kv_head_repeated_for_its_query_heads(rng):
    """The cpu op (the emulated kernels' reference) against a direct numpy computation, GQA
    as Hugging Face's repeat_kv: query head h reads KV head h // (NH / KV)."""
    nh, kv, hd = HEADS[1]
    qkv = randn(rng, B, T, (nh + 2 * kv) * hd)
    k, v = randn(rng, B, kv, CAP, hd), randn(rng, B, kv, CAP, hd)
    out = np.empty((B, T, nh * hd), np.float32)
    ops.kv_attention(out, qkv, k, v, POS, nh, kv)
    for b in (0, 1, 3):
        L = POS[b] + T
        for h in range(nh):
            kh, q = h // (nh // kv), qkv[b, :, h * hd:(h + 1) * hd].astype(np.float64)
            s = q @ k[b, kh, :L].T / math.sqrt(hd)
            s[np.arange(L)[None, :] > POS[b] + np.arange(T)[:, None]] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            y = (p / p.sum(-1, keepdims=True)) @ v[b, kh, :L]
            assert rel_err(out[b, :, h * hd:(h + 1) * hd], y) <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@covers("gather_rows")
def test_gather_rows_takes_one_row_per_sequence(rng, block):
    x, rows = randn(rng, B, T, C), ROWS
    out = np.full((B, C), np.nan, np.float32)
    gpu().launch("gather_rows", grid_1d(B * C, block), block, out, x, rows, B, T, C)
    assert np.array_equal(out, x[np.arange(B), rows])


# --- bf16 twins -----------------------------------------------------------------------------------

def to_bf16(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(BF16))


def launch_twins(name, grid, block, *args):
    """`name`_bf16 on args and `name` on float32 copies (bf16 arrays widened, aliases kept): every
    bf16 array must be the fp32 run's rounded once, every other array the fp32 run's bits."""
    copies, twin = {}, []
    for a in args:
        if isinstance(a, np.ndarray):
            copies.setdefault(id(a), a.astype(np.float32) if a.dtype == BF16 else a.copy())
            twin.append(copies[id(a)])
        else:
            twin.append(a)
    gpu().launch(name + "_bf16", grid, block, *args)
    gpu().launch(name, grid, block, *twin)
    for i, (a, f) in enumerate(zip(args, twin)):
        if isinstance(a, np.ndarray):
            same = a.view(np.uint16).tobytes() == to_bf16(f).view(np.uint16).tobytes() if a.dtype == BF16 \
                else a.tobytes() == f.tobytes()
            assert same, f"{name}_bf16 argument {i} differs from the fp32 kernel's"


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("heads", [HEADS[0], HEADS[1]])
@covers("embed_at_bf16", "rope_at_bf16", "kv_store_bf16", "kv_attention_bf16", "gather_rows_bf16")
def test_bf16_twins_are_the_fp32_kernels_rounded_once(rng, block, heads):
    nh, kv, hd = heads
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe, out = to_bf16(randn(rng, V, C)), to_bf16(randn(rng, CAP, C)), to_bf16(np.zeros((B, T, C)))
    launch_twins("embed_at", grid_1d(B * T * C, block), block, out, idx, wte, wpe, POS, B * T, T, C)
    launch_twins("embed_at", grid_1d(B * T * C, block), block, out, idx, wte, None, POS, B * T, T, C)
    qkv = to_bf16(randn(rng, B, T, (nh + 2 * kv) * hd))
    cos, sin = cos_sin(rng, hd)
    launch_twins("rope_at", grid_1d(B * T * (nh + kv) * hd // 2, block), block, qkv, cos, sin, POS, B, T, nh, kv,
                 hd)
    k, v = to_bf16(randn(rng, B, kv, CAP, hd)), to_bf16(randn(rng, B, kv, CAP, hd))
    launch_twins("kv_store", grid_1d(B * T * kv * hd, block), block, k, v, qkv, POS, B, T, nh, kv, hd, CAP)
    scores = np.zeros(B * nh * T * CAP, np.float32)
    out = to_bf16(np.zeros((B, T, nh * hd)))
    launch_twins("kv_attention", grid_rows(B * nh * T), block, out, qkv, k, v, scores, POS, B, T, nh, kv, hd, CAP,
                 1.0 / math.sqrt(hd))
    last = to_bf16(np.zeros((B, nh * hd)))
    launch_twins("gather_rows", grid_1d(B * nh * hd, block), block, last, out, ROWS, B, T, nh * hd)
