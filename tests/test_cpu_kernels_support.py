"""What the cpu kernels are built on: BLAS gemm called from numba, and vectorizable exp/tanh."""

import ctypes
import math

import numpy as np
import pytest
from numba import njit

from crystal.backends.cpu_blas import BINDING, gemm, lp64_adapter
from crystal.backends.cpu_math import fexp, ftanh


@njit(nogil=True)
def _gemm_call(ta, tb, M, N, K, A, a_off, lda, B, b_off, ldb, beta, C, c_off, ldc):
    gemm(ta, tb, M, N, K, A, a_off, lda, B, b_off, ldb, beta, C, c_off, ldc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_computes_op_a_times_op_b_on_strided_sub_matrices(dtype, ta, tb):
    rng = np.random.default_rng(1)
    M, N, K = 5, 7, 3
    # each matrix sits inside a wider buffer at an offset, rows strided by the buffer's width
    a_shape, b_shape = ((K, M) if ta else (M, K)), ((N, K) if tb else (K, N))
    A, B = rng.standard_normal((9, 11)).astype(dtype), rng.standard_normal((10, 10)).astype(dtype)
    C = rng.standard_normal((6, 12)).astype(dtype)
    a = A[1:1 + a_shape[0], 2:2 + a_shape[1]]
    b = B[2:2 + b_shape[0], 1:1 + b_shape[1]]
    expected = C.copy()
    opa, opb = (a.T if ta else a), (b.T if tb else b)
    expected[1:1 + M, 3:3 + N] = opa @ opb + 0.5 * C[1:1 + M, 3:3 + N]
    _gemm_call(ta, tb, M, N, K, A.reshape(-1), 1 * 11 + 2, 11, B.reshape(-1), 2 * 10 + 1, 10, 0.5,
               C.reshape(-1), 1 * 12 + 3, 12)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(C, expected, rtol=tol, atol=tol)  # and nothing outside is touched


def test_gemm_is_bound_to_numpys_blas():
    assert set(BINDING.source) == {"s", "d"}


def test_lp64_adapter_narrows_the_integers_for_a_32_bit_blas():
    # a stand-in LP64 sgemm that records its integer arguments
    i32, f32, ptr = ctypes.c_int32, ctypes.c_float, ctypes.c_size_t
    seen = []

    def fake_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
        seen.extend([order, ta, tb, M, N, K, lda, ldb, ldc])

    fake = ctypes.CFUNCTYPE(None, i32, i32, i32, i32, i32, i32, f32, ptr, i32, ptr, i32, f32, ptr, i32)(fake_sgemm)
    adapter = lp64_adapter(ctypes.cast(fake, ctypes.c_void_p).value, np.float32)
    i64 = ctypes.c_int64
    call = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64)(adapter.address)
    call(101, 111, 112, 2, 3, 4, 1.0, 0, 5, 0, 6, 0.0, 0, 7)
    assert seen == [101, 111, 112, 2, 3, 4, 5, 6, 7]


# --- exp and tanh ------------------------------------------------------------------------------

@njit(nogil=True, error_model="numpy")
def _vexp(out, x):
    for i in range(x.size):
        out[i] = fexp(x[i])


@njit(nogil=True, error_model="numpy")
def _vtanh(out, x):
    for i in range(x.size):
        out[i] = ftanh(x[i])


def _ulps(got, x, exact):
    ref = exact(x.astype(np.float64))
    return np.abs(got.astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32))


def test_float32_exp_is_within_one_ulp_over_the_normal_range():
    x = np.linspace(-87.3, 88.3, 400_001, dtype=np.float32)
    out = np.empty_like(x)
    _vexp(out, x)
    assert _ulps(out, x, np.exp).max() <= 1.0


def test_float32_exp_of_special_values():
    x = np.array([-np.inf, -100.0, 0.0, np.inf, np.nan, 100.0], np.float32)
    out = np.empty_like(x)
    _vexp(out, x)
    assert out[:2].tolist() == [0.0, 0.0] and out[2] == 1.0 and out[3] == np.inf
    assert np.isnan(out[4]) and out[5] == np.inf


def test_float32_tanh_is_within_two_ulp_and_odd():
    x = np.concatenate([np.linspace(-12, 12, 400_001, dtype=np.float32),
                        np.array([1e-30, 3e-8, 0.6249, 0.6251], np.float32)])
    out, neg = np.empty_like(x), np.empty_like(x)
    _vtanh(out, x)
    _vtanh(neg, -x)
    assert _ulps(out, x, np.tanh).max() <= 2.0
    np.testing.assert_array_equal(neg, -out)


def test_float32_tanh_of_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 50.0], np.float32)
    out = np.empty_like(x)
    _vtanh(out, x)
    assert out[0] == 1.0 and out[1] == -1.0 and np.isnan(out[2]) and out[3] == 0.0 and out[4] == 1.0


def test_float64_exp_and_tanh_are_libms():
    x = np.linspace(-20, 20, 1001)
    e, t = np.empty_like(x), np.empty_like(x)
    _vexp(e, x)
    _vtanh(t, x)
    assert e.tolist() == [math.exp(v) for v in x]
    assert t.tolist() == [math.tanh(v) for v in x]
