"""The fused kernels of kernels/*.cu (one launch doing the work of several), run on the CPU under
emulation (tests/emu), against the kernels they replace and the cpu backend.

- residual_layernorm_forward(_bf16): bit for bit residual_forward then layernorm_forward;
- crossentropy_forward_backward(_bf16): the cpu backend's crossentropy_forward then
  crossentropy_backward within float32 rounding (its online softmax sums in another order), bf16
  within one rounding; in place; bitwise run to run; the bf16 twin is the fp32 kernel's result
  rounded once;
- adamw_update_copy_bf16: bit for bit adamw_update then cast_to_bf16;
- add_scale_sum_squares_partial: bit for bit add_inplace, scale_inplace, sum_squares_partial.
Blocks 32 and 64 (neither divides the sizes), odd row lengths. Error measure of rel_err:
max|actual - expected| / max|expected|.
"""

from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest

from crystal.backends.base import AdamWScalars
from crystal.backends.cpu import CpuBackend
from crystal.backends.kernels import KERNELS, REDUCE_BLOCKS, grid_1d, grid_rows
from emu.build import parse_global_kernels
from emu.coverage import Coverage, gpu
from compare import rel_err

BLOCKS = [32, 64]
TOL = 1e-5  # float32 results whose reductions run in another order than the cpu's
TOL_ROUND = 4e-3  # one bf16 rounding (<= 2^-8 relative) of a float32 row
BF16 = np.dtype(ml_dtypes.bfloat16)

# The fused kernels: name -> (file, argument kinds), the contract with crystal/backends/cuda.py.
FUSED = {
    "residual_layernorm_forward": ("layernorm.cu", ("ptr",) * 8 + ("i32", "i32", "f32")),
    "residual_layernorm_forward_bf16": ("layernorm.cu", ("ptr",) * 8 + ("i32", "i32", "f32")),
    "crossentropy_forward_backward": ("crossentropy.cu", ("ptr",) * 4 + ("i32", "i32", "i32", "f32")),
    "crossentropy_forward_backward_bf16": ("crossentropy.cu",
                                           ("ptr",) * 4 + ("i32", "i32", "i32", "f32")),
    "adamw_update_copy_bf16": ("adamw.cu", ("ptr",) * 6 + ("i32", "i64", "ptr")),
    "add_scale_sum_squares_partial": ("norm.cu", ("ptr", "ptr", "f64", "ptr", "i64")),
}

be = CpuBackend()
COVERAGE = Coverage()
COVERED, covers = COVERAGE.covered, COVERAGE.covers


@pytest.fixture
def rng():
    return np.random.default_rng(2468)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_bf16(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(BF16))


def widen(h) -> np.ndarray:
    return h.astype(np.float32)


def bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def nan_like(a) -> np.ndarray:
    """An output buffer of a's shape and dtype that the kernel must overwrite everywhere."""
    return np.full(a.shape, np.nan, np.float32).astype(a.dtype)


# --- the kernel set ---------------------------------------------------------------------------

def test_fused_kernels_keep_their_names_files_and_argument_kinds():
    found = parse_global_kernels()
    for name, (file, args) in FUSED.items():
        assert found.get(name) == file, name
        assert (KERNELS[name].file, KERNELS[name].args) == (file, args), name


def test_fused_every_kernel_is_exercised_by_a_test():
    """(the tests also launch the kernels each fused one replaces, as references)"""
    assert set(FUSED) <= set(COVERED)


# --- residual + layernorm ---------------------------------------------------------------------

def residual_layernorm_inputs(rng, n, c, dtype):
    cast = to_bf16 if dtype == BF16 else (lambda x: np.asarray(x, np.float32))
    a = cast(rng.standard_normal((n, c)) * 2.0 + 0.5)
    b = cast(rng.standard_normal((n, c)))
    return a, b, cast(rng.standard_normal(c)), cast(rng.standard_normal(c))


def unfused_residual_layernorm(a, b, w, bias, c, block, suffix):
    n = a.shape[0]
    res, ln = nan_like(a), nan_like(a)
    mean, rstd = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    gpu().launch("residual_forward" + suffix, grid_1d(n * c, block), block, res, a, b, n * c)
    gpu().launch("layernorm_forward" + suffix, grid_rows(n), block, ln, mean, rstd, res, w, bias,
                 n, c, 1e-5)
    return res, ln, mean, rstd


@pytest.mark.parametrize("block, c", [(32, 77), (64, 77), (32, 48), (64, 200)])
@covers("residual_layernorm_forward", "residual_layernorm_forward_bf16", "residual_forward",
        "layernorm_forward", "residual_forward_bf16", "layernorm_forward_bf16")
def test_residual_layernorm_forward_emulated_is_bitwise_the_two_kernels(rng, block, c):
    """C = 77 and 200: odd, and not a multiple of either block; 48: threads past C in a row."""
    n = 37
    for dtype, suffix in ((np.float32, ""), (BF16, "_bf16")):
        a, b, w, bias = residual_layernorm_inputs(rng, n, c, dtype)
        expected = unfused_residual_layernorm(a, b, w, bias, c, block, suffix)
        res, ln = nan_like(a), nan_like(a)
        mean, rstd = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        gpu().launch("residual_layernorm_forward" + suffix, grid_rows(n), block, res, ln, mean,
                     rstd, a, b, w, bias, n, c, 1e-5)
        for actual, e in zip((res, ln, mean, rstd), expected):
            assert bits(actual) == bits(e)


@pytest.mark.parametrize("block", BLOCKS)
@covers("residual_layernorm_forward", "residual_layernorm_forward_bf16")
def test_residual_layernorm_forward_emulated_in_place_matches_cpu(rng, block):
    """res_out aliasing a (x += f(x)): the cpu backend's residual_forward + layernorm_forward."""
    n, c = 11, 77
    for dtype, suffix in ((np.float32, ""), (BF16, "_bf16")):
        a, b, w, bias = residual_layernorm_inputs(rng, n, c, dtype)
        e_res, e_ln = np.empty((n, c), np.float32), np.empty((n, c), np.float32)
        e_mean, e_rstd = np.empty(n, np.float32), np.empty(n, np.float32)
        be.residual_forward(e_res, widen(a), widen(b))
        if suffix:
            e_res = widen(to_bf16(e_res))  # the stored residual is rounded before the norm
        be.layernorm_forward(e_ln, e_mean, e_rstd, e_res, widen(w), widen(bias), 1e-5)
        ln, mean, rstd = nan_like(a), np.empty(n, np.float32), np.empty(n, np.float32)
        gpu().launch("residual_layernorm_forward" + suffix, grid_rows(n), block, a, ln, mean,
                     rstd, a, b, w, bias, n, c, 1e-5)
        assert bits(widen(a)) == bits(e_res)  # one float add on equal inputs (rounded once)
        assert rel_err(widen(ln), e_ln) <= (TOL_ROUND if suffix else TOL)
        assert rel_err(mean, e_mean) <= TOL and rel_err(rstd, e_rstd) <= TOL


# --- cross-entropy forward + backward ---------------------------------------------------------

def crossentropy_inputs(rng, n, v, dtype, vp=None):
    """[n, vp] logits whose first v columns are the vocabulary; the LM head's padding columns
    after them hold 60, which would dominate any softmax that read them."""
    logits = np.full((n, vp or v), 60.0)
    logits[:, :v] = rng.standard_normal((n, v)) * 3.0
    logits[0, :v] = np.linspace(-5.0, 9.0, v)  # increasing: every thread's max grows at each element
    logits[1, :v] = np.linspace(9.0, -5.0, v)  # decreasing: the max never moves
    logits[2, v // 2] = 40.0  # one dominant logit
    targets = rng.integers(0, v, n).astype(np.int32)
    targets[:4] = [0, v - 1, v // 2, 1][:n]  # both ends of the vocabulary, the dominant logit
    targets[-2:] = -1  # ignored (a prompt token): loss 0 and gradient row 0, the row never read
    cast = to_bf16 if dtype == BF16 else (lambda x: np.asarray(x, np.float32))
    return cast(logits), targets


def cpu_crossentropy(logits, targets, dloss, v=None):
    """The cpu backend's crossentropy_forward then crossentropy_backward, on float32 (the
    vocabulary: the first v columns)."""
    n = logits.shape[0]
    losses, probs = np.empty(n, np.float32), np.empty(logits.shape, np.float32)
    be.crossentropy_forward(losses, probs, widen(logits), targets, v)
    dlogits = np.empty_like(probs)
    be.crossentropy_backward(dlogits, probs, targets, dloss, v)
    return losses, dlogits


def row_rel_err(actual, expected, dloss) -> float:
    """Largest over rows of max|actual - expected| / max|expected| within the row, over the rows
    whose largest gradient is at least dloss/2: not where the target's probability is ~1 and
    (p - 1) dloss cancels to a few float32 ulps of dloss (those rows count in rel_err over the
    whole array, whose scale is dloss)."""
    keep = np.abs(expected).max(axis=1) >= dloss / 2
    assert keep.sum() >= len(keep) // 2
    return max(rel_err(a, e) for a, e in zip(actual[keep], expected[keep]))


@pytest.mark.parametrize("block, in_place, v, vp", [(32, True, 259, 320), (64, False, 259, 259),
                                                     (64, True, 21, 64)])  # 21: most threads idle
@covers("crossentropy_forward_backward", "crossentropy_forward_backward_bf16")
def test_crossentropy_forward_backward_emulated_matches_cpu(rng, block, in_place, v, vp):
    """vp > v: rows of vp logits whose first v are the vocabulary (LM-head padding after them)."""
    n, dloss = 29, 1.0 / 29
    for dtype, suffix, tol in ((np.float32, "", TOL), (BF16, "_bf16", TOL_ROUND)):
        logits, targets = crossentropy_inputs(rng, n, v, dtype, vp)
        e_losses, e_dlogits = cpu_crossentropy(logits, targets, dloss, v)
        losses = np.full(n, np.nan, np.float32)
        dlogits = logits.copy() if in_place else nan_like(logits)
        gpu().launch("crossentropy_forward_backward" + suffix, grid_rows(n), block, losses,
                     dlogits, dlogits if in_place else logits, targets, n, v, vp, dloss)
        assert rel_err(losses, e_losses) <= TOL  # float32 in both precisions
        assert rel_err(widen(dlogits), e_dlogits) <= tol
        assert not widen(dlogits)[:, v:].any()  # the padding's gradient: 0
        assert not losses[-2:].any() and not widen(dlogits)[-2:].any()  # the ignored targets': exactly 0
        assert row_rel_err(widen(dlogits), e_dlogits, dloss) <= tol
        # each row of the gradient sums to 0 (the softmax sums to 1), up to its roundings (and
        # an ulp of 1 times dloss, where the target's probability is ~1)
        d64 = widen(dlogits).astype(np.float64)
        assert np.all(np.abs(d64.sum(1)) <= tol * np.abs(d64).sum(1) + 2.0 ** -23 * dloss)


@pytest.mark.parametrize("block", BLOCKS)
@covers("crossentropy_forward_backward", "crossentropy_forward_backward_bf16")
def test_crossentropy_forward_backward_emulated_in_place_bitwise_out_of_place_and_run_to_run(
        rng, block):
    n, v, dloss = 13, 259, 0.25
    for dtype, suffix in ((np.float32, ""), (BF16, "_bf16")):
        logits, targets = crossentropy_inputs(rng, n, v, dtype)
        runs = []
        for in_place in (False, True, True):
            losses = np.full(n, np.nan, np.float32)
            dlogits = logits.copy() if in_place else nan_like(logits)
            gpu().launch("crossentropy_forward_backward" + suffix, grid_rows(n), block, losses,
                         dlogits, dlogits if in_place else logits, targets, n, v, v, dloss)
            runs.append(bits(losses) + bits(dlogits))
        assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("block, in_place", [(32, True), (64, False)])
@covers("crossentropy_forward_backward", "crossentropy_forward_backward_bf16")
def test_crossentropy_forward_backward_bf16_is_the_fp32_kernel_rounded_once(rng, block, in_place):
    n, v, dloss = 17, 131, 1.0 / 17
    logits, targets = crossentropy_inputs(rng, n, v, BF16)
    f32 = widen(logits)
    losses, losses32 = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    dlogits = logits.copy() if in_place else nan_like(logits)
    dlogits32 = f32.copy() if in_place else np.full_like(f32, np.nan)
    gpu().launch("crossentropy_forward_backward_bf16", grid_rows(n), block, losses, dlogits,
                 dlogits if in_place else logits, targets, n, v, v, dloss)
    gpu().launch("crossentropy_forward_backward", grid_rows(n), block, losses32, dlogits32,
                 dlogits32 if in_place else f32, targets, n, v, v, dloss)
    assert bits(losses) == bits(losses32)
    assert bits(dlogits) == bits(to_bf16(dlogits32))


@covers("crossentropy_forward_backward", "residual_layernorm_forward")
def test_fused_row_kernels_emulated_with_1024_threads_per_block(rng):
    block, rows = 1024, 3  # 32 warps: block_max_sum's second stage combines 32 partials
    v = 2 * block + 7
    logits, targets = crossentropy_inputs(rng, rows, v, np.float32)
    e_losses, e_dlogits = cpu_crossentropy(logits, targets, 0.5)
    losses, dlogits = np.empty(rows, np.float32), nan_like(logits)
    gpu().launch("crossentropy_forward_backward", grid_rows(rows), block, losses, dlogits, logits,
                 targets, rows, v, v, 0.5)
    assert rel_err(losses, e_losses) <= TOL
    assert rel_err(dlogits, e_dlogits) <= TOL
    assert row_rel_err(dlogits, e_dlogits, 0.5) <= TOL

    c = 77
    a, b, w, bias = residual_layernorm_inputs(rng, rows, c, np.float32)
    expected = unfused_residual_layernorm(a, b, w, bias, c, block, "")
    out = [nan_like(a), nan_like(a), np.empty(rows, np.float32), np.empty(rows, np.float32)]
    gpu().launch("residual_layernorm_forward", grid_rows(rows), block, *out, a, b, w, bias, rows,
                 c, 1e-5)
    for actual, e in zip(out, expected):
        assert bits(actual) == bits(e)


# --- AdamW + the bf16 weight copy -------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@covers("adamw_update_copy_bf16", "adamw_update", "cast_to_bf16")
def test_adamw_update_copy_bf16_emulated_is_bitwise_adamw_then_cast(rng, block):
    n = 1001
    ranges = np.array([[0, 300, 1], [300, 333, 0], [333, 334, 1], [334, n, 0]], np.int64)
    params, grads = randn(rng, n), randn(rng, n)
    params[:3] = [3.0e38, 1e-40, 0.0]  # huge, subnormal, 0
    params[300:302] = [3.4e38, -3.4e38]  # no decay there: stay above bf16's largest finite
    m, v = randn(rng, n, scale=0.1), np.abs(randn(rng, n, scale=0.01))
    scalars = AdamWScalars.of(3e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.7)
    c_params, c_m, c_v = params.copy(), m.copy(), v.copy()
    be.adamw_update(c_params, grads, c_m, c_v, ranges, scalars)

    e_params, e_m, e_v = params.copy(), m.copy(), v.copy()
    gpu().launch("adamw_update", grid_1d(n, block), block, e_params, grads, e_m, e_v, ranges,
                 len(ranges), n, scalars.packed())
    e_copy = np.full(n, 0xAAAA, np.uint16).view(BF16)
    gpu().launch("cast_to_bf16", grid_1d(n, block), block, e_copy, e_params, n)

    copy = np.full(n, 0x5555, np.uint16).view(BF16)
    gpu().launch("adamw_update_copy_bf16", grid_1d(n, block), block, params, copy, grads, m, v,
                 ranges, len(ranges), n, scalars.packed())
    for actual, e in zip((params, m, v, copy), (e_params, e_m, e_v, e_copy)):
        assert bits(actual) == bits(e)
    for actual, e in zip((params, m, v), (c_params, c_m, c_v)):  # and the cpu backend's AdamW
        assert bits(actual) == bits(e)
    with np.errstate(over="ignore"):
        assert bits(copy) == bits(to_bf16(params))  # round to nearest even
    assert np.isinf(widen(copy[300:302])).all()  # rounded to +-inf, as cast_to_bf16 does


# --- the reducer's add + scale + sum of squares -----------------------------------------------

def unfused_add_scale_sum_squares(acc, x, s, block):
    n = acc.size
    partial, total = np.full(REDUCE_BLOCKS, np.nan), np.full(1, np.nan)
    gpu().launch("add_inplace", grid_1d(n, block), block, acc, x, n)
    gpu().launch("scale_inplace", grid_1d(n, block), block, acc, s, n)
    gpu().launch("sum_squares_partial", (REDUCE_BLOCKS, 1, 1), block, partial, acc, n)
    gpu().launch("sum_doubles", (1, 1, 1), block, total, partial, REDUCE_BLOCKS)
    return partial, total


@pytest.mark.parametrize("block, n", [(32, 10007), (64, 10007), (32, 20011), (32, 5)])
@covers("add_scale_sum_squares_partial", "add_inplace", "scale_inplace", "sum_squares_partial",
        "sum_doubles")
def test_add_scale_sum_squares_partial_emulated_is_bitwise_the_three_kernels(rng, block, n):
    """10007: not a multiple of the block; 20011 at block 32: more elements than the grid's
    threads (the grid-stride loop turns); 5: most blocks see no element."""
    acc, x, s = randn(rng, n), randn(rng, n, scale=3.0), 1.0 / 3.0
    slots = np.stack([acc, x])  # the cpu backend's reducer on the same chunk
    c_total = be.reduce_slots(slots, np.array([[0, 1]], np.int64), 0, n, s)
    e_acc = acc.copy()
    e_partial, e_total = unfused_add_scale_sum_squares(e_acc, x, s, block)

    partial, total = np.full(REDUCE_BLOCKS, np.nan), np.full(1, np.nan)
    gpu().launch("add_scale_sum_squares_partial", (REDUCE_BLOCKS, 1, 1), block, acc, x, s,
                 partial, n)
    gpu().launch("sum_doubles", (1, 1, 1), block, total, partial, REDUCE_BLOCKS)
    assert bits(acc) == bits(e_acc)
    assert bits(partial) == bits(e_partial)
    assert bits(total) == bits(e_total)
    assert bits(acc) == bits(slots[0])  # float add, double scale rounded to float: as the cpu's
    assert rel_err(total, c_total) <= 1e-12  # the double sum in another order
