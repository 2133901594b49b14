"""kernels/kv_cache.cu (inference, crystal.generate) under CPU emulation: each fp32 kernel matches
the cpu backend's inference op (crystal.backends.cpu_infer), and each `_bf16` twin is the fp32
kernel on the widened inputs with every stored value rounded once (its copies: bit for bit).

Shapes are odd (C=48 with blocks of 32 and 64, three heads, sequences at different positions)
and the caches start full of other values, so a kernel that writes or reads the wrong
position shows.
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


@pytest.mark.parametrize("block", BLOCKS)
@covers("kv_store", "kv_attention")
def test_kv_attention_stores_the_new_keys_and_attends_causally_to_the_cache(rng, block):
    qkv = randn(rng, B, T, 3 * C)
    k0, v0 = randn(rng, B, NH, CAP, HS), randn(rng, B, NH, CAP, HS)  # earlier positions' keys, values
    k, v, out = k0.copy(), v0.copy(), np.full((B, T, C), np.nan, np.float32)
    scores = np.empty(B * NH * T * CAP, np.float32)
    gpu().launch("kv_store", grid_1d(B * T * C, block), block, k, v, qkv, POS, B, T, NH, HS, CAP)
    gpu().launch("kv_attention", grid_rows(B * NH * T), block, out, qkv, k, v, scores, POS, B, T, NH, HS, CAP,
                 1.0 / math.sqrt(HS))
    ek, ev, expected = k0.copy(), v0.copy(), np.empty((B, T, C), np.float32)
    ops.kv_attention(expected, qkv, ek, ev, POS, NH)
    assert np.array_equal(k, ek) and np.array_equal(v, ev)
    assert rel_err(out, expected) <= TOL
    assert np.array_equal(k[2], k0[2]) and not out[2].any()  # the row that sat out


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
@covers("embed_at_bf16", "kv_store_bf16", "kv_attention_bf16", "gather_rows_bf16")
def test_bf16_twins_are_the_fp32_kernels_rounded_once(rng, block):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe, out = to_bf16(randn(rng, V, C)), to_bf16(randn(rng, CAP, C)), to_bf16(np.zeros((B, T, C)))
    launch_twins("embed_at", grid_1d(B * T * C, block), block, out, idx, wte, wpe, POS, B * T, T, C)
    qkv = to_bf16(randn(rng, B, T, 3 * C))
    k, v = to_bf16(randn(rng, B, NH, CAP, HS)), to_bf16(randn(rng, B, NH, CAP, HS))
    launch_twins("kv_store", grid_1d(B * T * C, block), block, k, v, qkv, POS, B, T, NH, HS, CAP)
    scores = np.zeros(B * NH * T * CAP, np.float32)
    launch_twins("kv_attention", grid_rows(B * NH * T), block, out, qkv, k, v, scores, POS, B, T, NH, HS, CAP,
                 1.0 / math.sqrt(HS))
    last = to_bf16(np.zeros((B, C)))
    launch_twins("gather_rows", grid_1d(B * C, block), block, last, out, ROWS, B, T, C)
