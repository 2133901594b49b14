"""crystal.backends.cublaslt through tests/lt_standin.py, the numpy stand-in of nvmath's cuBLASLt
bindings: every variant against a float64 numpy reference, the descriptors handed to cuBLASLt,
the algorithm cache, the errors, and the stand-in's own column-major semantics."""

from __future__ import annotations

import ast
import inspect
import pathlib

import ml_dtypes
import numpy as np
import pytest
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as real

import crystal.backends.cublaslt as cublaslt
from crystal.backends.cublaslt import LtError, LtMatmul, device_pointer
from compare import rel_err
from emu.device import StreamCaptureError
from lt_standin import BF16, F32, INVALID_VALUE, NOT_SUPPORTED, LtStandIn, StandInError, gelu_tanh

bf16 = np.dtype(ml_dtypes.bfloat16)
WS_BYTES = 1 << 16
STREAM = 0x5EED
ODD, GPT = (37, 48, 144), (64, 768, 2304)  # (M, K, N): not multiples of 8; a GPT-2 QKV product
Desc, Pref, Layout = real.MatmulDescAttribute, real.MatmulPreferenceAttribute, real.MatrixLayoutAttribute


def aligned_empty(nbytes: int, align: int = 256) -> np.ndarray:
    """A uint8 buffer whose first byte is `align`-aligned (numpy guarantees less)."""
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


@pytest.fixture
def standin():
    return LtStandIn()


@pytest.fixture
def lt(standin):
    mm = LtMatmul(standin, aligned_empty(WS_BYTES), lambda: STREAM)
    yield mm
    mm.close()


def rand(rng, shape, dtype=bf16, ints: int = 0) -> np.ndarray:
    """Normal values, or integers in [-ints, ints] (small: every fp32 sum of their products is exact)."""
    x = rng.integers(-ints, ints + 1, shape) if ints else rng.standard_normal(shape)
    return x.astype(dtype)


def f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def op(x, t: bool) -> np.ndarray:
    return np.swapaxes(x, -1, -2) if t else x


def gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def operands(rng, M, K, N, trans_a=False, trans_b=False, batch=0, ints=0, out_dtype=bf16):
    lead = (batch,) if batch else ()
    a = rand(rng, lead + ((K, M) if trans_a else (M, K)), ints=ints)
    b = rand(rng, lead + ((N, K) if trans_b else (K, N)), ints=ints)
    return a, b, np.full(lead + (M, N), np.nan, out_dtype)


# --- every variant against float64 numpy ---
@pytest.mark.parametrize("shape", [ODD, GPT, (1, 1, 1), (5, 3, 7)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("out_dtype", [bf16, np.dtype(np.float32)])
def test_plain_and_transposed_products(lt, shape, trans_a, trans_b, out_dtype):
    M, K, N = shape
    a, b, out = operands(np.random.default_rng(1), M, K, N, trans_a, trans_b, out_dtype=out_dtype)
    lt.gemm(out, a, b, trans_a=trans_a, trans_b=trans_b)
    ref = op(f64(a), trans_a) @ op(f64(b), trans_b)
    assert rel_err(out, ref) <= (1e-2 if out_dtype == bf16 else 1e-5)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_exact_products_round_once(lt, trans_a, trans_b):
    """Integer operands: fp32 accumulation is exact, so a bf16 out is the exact product rounded
    once (ml_dtypes: round to nearest even) and an fp32 out is the exact product."""
    M, K, N = ODD
    a, b, out = operands(np.random.default_rng(2), M, K, N, trans_a, trans_b, ints=15)
    out32 = np.full((M, N), np.nan, np.float32)
    lt.gemm(out, a, b, trans_a=trans_a, trans_b=trans_b)
    lt.gemm(out32, a, b, trans_a=trans_a, trans_b=trans_b)
    ref = op(f64(a), trans_a) @ op(f64(b), trans_b)
    np.testing.assert_array_equal(out32, ref)
    np.testing.assert_array_equal(out, ref.astype(bf16))
    assert np.count_nonzero(f64(out) != ref) > M * N // 4  # many did round (bf16: 8 significant bits)


def test_bf16_out_is_the_fp32_out_rounded(lt):
    M, K, N = GPT
    a, b, out = operands(np.random.default_rng(3), M, K, N)
    out32 = np.empty((M, N), np.float32)
    lt.gemm(out, a, b)
    lt.gemm(out32, a, b)
    assert rel_err(out32, f64(a) @ f64(b)) <= 1e-5
    np.testing.assert_array_equal(out, out32.astype(bf16))


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)])
def test_column_blocks_in_place_and_accumulate(lt, standin, trans_a, trans_b):
    """Operands that are column blocks of wider row-major arrays are read with ld = the wide
    array's width (no copy); accumulate adds the product (beta = 1, C = D = out) with one rounding:
    integer operands, so the bf16 block is (old + exact product) rounded once; the columns around
    the block keep their bits."""
    M, K, N = 5, 3, 7
    rng = np.random.default_rng(8)
    wide = lambda rows, cols: rand(rng, (rows, cols + 9), ints=3)  # noqa: E731 (9 spare columns)
    a_w, b_w = wide(*((K, M) if trans_a else (M, K))), wide(*((N, K) if trans_b else (K, N)))
    a, b = a_w[:, 4:4 + a_w.shape[1] - 9], b_w[:, 2:2 + b_w.shape[1] - 9]
    out_w = rand(rng, (M, N + 9), ints=3)
    before = out_w.copy()
    lt.gemm(out_w[:, 5:5 + N], a, b, trans_a=trans_a, trans_b=trans_b, accumulate=True)
    ref = f64(before[:, 5:5 + N]) + op(f64(a), trans_a) @ op(f64(b), trans_b)
    np.testing.assert_array_equal(out_w[:, 5:5 + N], ref.astype(bf16))
    assert out_w[:, :5].tobytes() == before[:, :5].tobytes() and out_w[:, 5 + N:].tobytes() == before[:, 5 + N:].tobytes()
    call = standin.last_matmul
    # cuBLASLt's A is crystal's b, its B crystal's a
    assert call["beta"] == 1.0 and [call["layouts"][x][Layout.LD] for x in "ABD"] == [b_w.shape[1], a_w.shape[1], N + 9]
    with pytest.raises(ValueError, match="alone"):
        lt.gemm(out_w[:, :N], a, b, trans_a=trans_a, trans_b=trans_b, accumulate=True, bias=np.zeros(N, bf16))


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (False, False), (True, False)])
def test_batched_products(lt, trans_a, trans_b):
    """Attention's products on [B*NH, ., .]: scores q @ k^T, att @ v, and the backward's att^T @ dy."""
    BNH, T, hs = 6, 37, 16
    rng = np.random.default_rng(4)
    M, K, N = {(False, True): (T, hs, T), (False, False): (T, T, hs), (True, False): (T, T, hs)}[trans_a, trans_b]
    a, b, out = operands(rng, M, K, N, trans_a, trans_b, batch=BNH)
    lt.gemm(out, a, b, trans_a=trans_a, trans_b=trans_b)
    ref = op(f64(a), trans_a) @ op(f64(b), trans_b)
    assert rel_err(out, ref) <= 1e-2
    for i in range(BNH):  # each matrix of the batch on its own (strides right, no mixing)
        assert rel_err(out[i], ref[i]) <= 1e-2
    a, b, out = operands(rng, M, K, N, trans_a, trans_b, batch=BNH, ints=3)
    lt.gemm(out, a, b, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_array_equal(out, (op(f64(a), trans_a) @ op(f64(b), trans_b)).astype(bf16))


@pytest.mark.parametrize("shape", [ODD, GPT])
@pytest.mark.parametrize("out_dtype", [bf16, np.dtype(np.float32)])
def test_bias(lt, shape, out_dtype):
    M, K, N = shape
    rng = np.random.default_rng(5)
    a, b, out = operands(rng, M, K, N, out_dtype=out_dtype)
    bias = rand(rng, (N,), out_dtype)
    lt.gemm(out, a, b, bias=bias)
    assert rel_err(out, f64(a) @ f64(b) + f64(bias)) <= (1e-2 if out_dtype == bf16 else 1e-5)
    a, b, out = operands(rng, M, K, N, ints=3, out_dtype=out_dtype)
    bias = rand(rng, (N,), out_dtype, ints=3)
    lt.gemm(out, a, b, bias=bias)  # the bias is added to every row, before the one rounding
    np.testing.assert_array_equal(out, (f64(a) @ f64(b) + f64(bias)).astype(out_dtype))


@pytest.mark.parametrize("shape", [ODD, GPT])
def test_gelu_with_bias_saves_the_preactivation(lt, shape):
    M, K, N = shape
    rng = np.random.default_rng(6)
    a, b, out = operands(rng, M, K, N)
    bias, pre = rand(rng, (N,)), np.full((M, N), np.nan, bf16)
    lt.gemm(out, a, b, bias=bias, gelu_pre=pre)
    ref_pre = f64(a) @ f64(b) + f64(bias)
    assert rel_err(pre, ref_pre) <= 1e-2
    assert rel_err(out, gelu64(ref_pre)) <= 1e-2
    # out is GELU of the fp32 pre-activation (not of its bf16 copy), rounded once
    assert rel_err(out, gelu_tanh(ref_pre.astype(np.float32)).astype(bf16)) <= 2 ** -8
    a, b, out = operands(rng, M, K, N, ints=3)
    bias = rand(rng, (N,), ints=3)
    lt.gemm(out, a, b, bias=bias, gelu_pre=pre)
    ref_pre = f64(a) @ f64(b) + f64(bias)
    np.testing.assert_array_equal(pre, ref_pre.astype(bf16))
    np.testing.assert_array_equal(out, gelu_tanh(ref_pre.astype(np.float32)).astype(bf16))


@pytest.mark.parametrize("shape", [ODD, GPT])
def test_weight_and_bias_gradients_in_one_product(lt, shape):
    """dW = inp^T @ dout (fp32, straight into a gradient buffer) and dbias = the column sums of dout."""
    BT, C, OC = shape
    rng = np.random.default_rng(7)
    inp, dout = rand(rng, (BT, C)), rand(rng, (BT, OC))
    dw, dbias = np.full((C, OC), np.nan, np.float32), np.full(OC, np.nan, np.float32)
    lt.gemm(dw, inp, dout, trans_a=True, dbias=dbias)
    assert rel_err(dw, f64(inp).T @ f64(dout)) <= 1e-5
    assert rel_err(dbias, f64(dout).sum(0)) <= 1e-5
    inp, dout = rand(rng, (BT, C), ints=3), rand(rng, (BT, OC), ints=3)
    lt.gemm(dw, inp, dout, trans_a=True, dbias=dbias)
    np.testing.assert_array_equal(dw, f64(inp).T @ f64(dout))
    np.testing.assert_array_equal(dbias, f64(dout).sum(0))


@pytest.mark.parametrize("shape", [ODD, GPT])
def test_linear_weight_and_bias_gradients_in_one_product(lt, shape):
    """nn.Linear layout (Llama, w [OC, C]): dW = dout^T @ inp and dbias = the column sums of dout from
    BGRADB (llm.c's weight-gradient product: D = inp (N) . dout^T (T))."""
    BT, C, OC = shape
    rng = np.random.default_rng(7)
    inp, dout = rand(rng, (BT, C), ints=3), rand(rng, (BT, OC), ints=3)
    dw, dbias = np.full((OC, C), np.nan, np.float32), np.full(OC, np.nan, np.float32)
    lt.gemm(dw, dout, inp, trans_a=True, dbias_a=dbias)
    np.testing.assert_array_equal(dw, f64(dout).T @ f64(inp))
    np.testing.assert_array_equal(dbias, f64(dout).sum(0))
    desc = lt.lt.last_matmul["desc"]
    assert desc[Desc.EPILOGUE] == int(real.Epilogue.BGRADB) and desc[Desc.TRANSB] == int(cublas.Operation.T)


def test_the_epilogue_vectors_follow_each_call(lt):
    """Same kind of product, other bias/aux/dbias buffers: the cached descriptor takes the new ones."""
    M, K, N = ODD
    rng = np.random.default_rng(8)
    a, b, out = operands(rng, M, K, N, ints=3)
    for _ in range(2):
        bias, pre = rand(rng, (N,), ints=3), np.empty((M, N), bf16)
        lt.gemm(out, a, b, bias=bias, gelu_pre=pre)
        np.testing.assert_array_equal(pre, (f64(a) @ f64(b) + f64(bias)).astype(bf16))
        dout, dbias = rand(rng, (M, N), ints=3), np.empty(N, np.float32)
        lt.gemm(np.empty((K, N), np.float32), a, dout, trans_a=True, dbias=dbias)
        np.testing.assert_array_equal(dbias, f64(dout).sum(0))
    assert lt.lt.counts["matmul_algo_get_heuristic"] == 2


def test_uint16_storage_is_bf16(lt):
    """On a GPU, bf16 arrays are cupy uint16 storage: the same bits give the same product."""
    M, K, N = ODD
    rng = np.random.default_rng(20)
    a, b, out = operands(rng, M, K, N)
    bias, pre = rand(rng, (N,)), np.empty((M, N), bf16)
    lt.gemm(out, a, b, bias=bias, gelu_pre=pre)
    bits = np.empty((M, N), np.uint16), np.empty((M, N), np.uint16)
    lt.gemm(bits[0], a.view(np.uint16), b.view(np.uint16), bias=bias.view(np.uint16), gelu_pre=bits[1])
    np.testing.assert_array_equal(bits[0].view(bf16), out)
    np.testing.assert_array_equal(bits[1].view(bf16), pre)


def test_device_pointer():
    class DevicePtr:  # cupy's MemoryPointer: .ptr
        ptr = 0xDEAD00

    class CupyLike:
        data = DevicePtr()

    x = np.zeros(3, bf16)
    assert device_pointer(CupyLike()) == 0xDEAD00 and device_pointer(x) == x.ctypes.data


# --- what cuBLASLt is handed ---
def test_descriptors_handle_workspace_stream(standin, lt):
    M, K, N = ODD
    rng = np.random.default_rng(9)
    inp, dout = rand(rng, (M, K)), rand(rng, (M, N))
    dw, dbias = np.empty((K, N), np.float32), np.empty(N, np.float32)
    lt.gemm(dw, inp, dout, trans_a=True, dbias=dbias)
    call = standin.last_matmul
    assert call["handle"] == lt.handle and call["stream"] == STREAM
    assert call["workspace"] == device_pointer(lt.workspace) and call["workspace_size"] == WS_BYTES
    assert (call["alpha"], call["beta"]) == (1.0, 0.0)
    pref = call["preference"]
    assert pref[Pref.REDUCTION_SCHEME_MASK] == int(real.ReductionScheme.NONE)  # no split-K
    assert pref[Pref.MAX_WORKSPACE_BYTES] == WS_BYTES
    desc = call["desc"]
    assert desc[Desc.COMPUTE_TYPE] == int(cublas.ComputeType.COMPUTE_32F) and desc[Desc.SCALE_TYPE] == F32
    # column-major: A = dout (N x BT, op N), B = inp (K x BT read, op T), D = dW^T (N x K)
    assert (desc[Desc.TRANSA], desc[Desc.TRANSB]) == (int(cublas.Operation.N), int(cublas.Operation.T))
    assert desc[Desc.EPILOGUE] == int(real.Epilogue.BGRADA) and desc[Desc.BIAS_POINTER] == dbias.ctypes.data
    assert desc[Desc.BIAS_DATA_TYPE] == F32
    lay = call["layouts"]
    assert [(lay[x][Layout.TYPE], lay[x][Layout.ROWS], lay[x][Layout.COLS], lay[x][Layout.LD]) for x in "ABD"] == [
        (BF16, N, M, N), (BF16, K, M, K), (F32, N, K, N)]
    assert call["pointers"]["A"] == dout.ctypes.data and call["pointers"]["B"] == inp.ctypes.data
    assert call["pointers"]["C"] == call["pointers"]["D"] == dw.ctypes.data


def test_forward_epilogues_descriptors(standin, lt):
    M, K, N = ODD
    rng = np.random.default_rng(10)
    a, b, out = operands(rng, M, K, N)
    bias, pre = rand(rng, (N,)), np.empty((M, N), bf16)
    lt.gemm(out, a, b, bias=bias)
    desc = standin.last_matmul["desc"]
    assert desc[Desc.EPILOGUE] == int(real.Epilogue.BIAS) and desc[Desc.BIAS_POINTER] == bias.ctypes.data
    assert desc[Desc.BIAS_DATA_TYPE] == BF16
    lt.gemm(out, a, b, bias=bias, gelu_pre=pre)
    desc = standin.last_matmul["desc"]
    assert desc[Desc.EPILOGUE] == int(real.Epilogue.GELU_AUX_BIAS)
    assert desc[Desc.EPILOGUE_AUX_POINTER] == pre.ctypes.data and desc[Desc.EPILOGUE_AUX_LD] == N
    assert desc[Desc.EPILOGUE_AUX_DATA_TYPE] == -1  # unset: D's type (cuBLASLt refuses another)


def test_batched_layouts(standin, lt):
    BNH, T, hs = 6, 37, 16
    a, b, out = operands(np.random.default_rng(11), T, hs, T, False, True, batch=BNH)
    lt.gemm(out, a, b, trans_b=True)
    lay = standin.last_matmul["layouts"]
    assert [(lay[x][Layout.BATCH_COUNT], lay[x][Layout.STRIDED_BATCH_OFFSET]) for x in "ABCD"] == [
        (BNH, T * hs), (BNH, T * hs), (BNH, T * T), (BNH, T * T)]


def test_an_algorithm_is_chosen_once_per_kind_of_product(standin, lt):
    M, K, N = ODD
    rng = np.random.default_rng(12)
    a, b, out = operands(rng, M, K, N)
    lt.gemm(out, a, b)
    first = standin.last_matmul["algo_alignments"], standin.counts["matmul_algo_get_heuristic"]
    a2, b2, out2 = operands(rng, M, K, N)  # other buffers, the same kind of product
    lt.gemm(out2, a2, b2)
    lt.gemm(out, a, b)
    assert standin.counts["matmul_algo_get_heuristic"] == first[1] == 1
    assert standin.counts["matmul"] == 3 and standin.counts["matmul_desc_create"] == 1
    lt.gemm(out, a, b, bias=rand(rng, (N,)))  # another epilogue: another algorithm
    lt.gemm(out[:5], a[:5], b)  # another shape: another algorithm
    assert standin.counts["matmul_algo_get_heuristic"] == 3


def test_pointers_less_aligned_get_an_algorithm_of_their_own(standin, lt):
    """A view 2 bytes off: the heuristic is told (MIN_ALIGNMENT_*), and the stand-in checks the
    algorithm it answered with is not used on pointers less aligned than it was told."""
    M, K, N = ODD
    rng = np.random.default_rng(13)
    a, b, _ = operands(rng, M, K, N, ints=3)
    buf = np.zeros(M * N + 1, bf16)
    out = buf[1:].reshape(M, N)  # 2-byte aligned
    lt.gemm(out, a, b)
    assert standin.last_matmul["preference"][Pref.MIN_ALIGNMENT_D_BYTES] == 2
    np.testing.assert_array_equal(out, (f64(a) @ f64(b)).astype(bf16))
    assert buf[0] == 0
    out16 = np.empty((M, N), bf16)
    lt.gemm(out16, a, b)
    assert standin.counts["matmul_algo_get_heuristic"] == 2
    assert standin.last_matmul["preference"][Pref.MIN_ALIGNMENT_D_BYTES] == 16


def test_close_destroys_everything(standin):
    mm = LtMatmul(standin, aligned_empty(WS_BYTES))
    a, b, out = operands(np.random.default_rng(14), *ODD)
    mm.gemm(out, a, b)
    mm.gemm(out, a, b, bias=np.zeros(ODD[2], bf16))
    assert standin.live() == {"handle": 1, "desc": 2, "layout": 6, "pref": 2}
    assert standin.last_matmul["stream"] == 0  # the default stream
    mm.close()
    mm.close()
    assert not standin.live()
    with pytest.raises(LtError, match="after close"):
        mm.gemm(out, a, b)


def test_one_standin_serves_sphere_threads(standin):
    """Each sphere thread has its own LtMatmul (handle, workspace); one stand-in serves them all."""
    import threading

    M, K, N = ODD
    results, errors = {}, []

    def sphere(i):
        try:
            rng = np.random.default_rng(100 + i)
            mm = LtMatmul(standin, aligned_empty(WS_BYTES), lambda: 1000 + i)
            for _ in range(10):
                a, b, out = operands(rng, M, K, N, ints=3)
                mm.gemm(out, a, b, bias=np.ones(N, bf16))
                results.setdefault(i, []).append(bool((out == (f64(a) @ f64(b) + 1).astype(bf16)).all()))
            mm.close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=sphere, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(all(r) and len(r) == 10 for r in results.values()) and len(results) == 4
    assert not standin.live()


# --- errors ---
def test_no_algorithm_is_one_line_lterror():
    standin = LtStandIn(n_algos=0)
    mm = LtMatmul(standin, aligned_empty(WS_BYTES))
    a, b, out = operands(np.random.default_rng(15), *ODD)
    with pytest.raises(LtError) as e:
        mm.gemm(out, a, b)
    assert "no algorithm" in str(e.value) and "\n" not in str(e.value)
    mm.close()
    assert not standin.live()  # the failed plan's descriptors were destroyed too


def test_a_refused_heuristic_is_one_line_lterror():
    class Refusing(LtStandIn):
        def matmul_algo_get_heuristic(self, *args, **kwargs):
            raise StandInError(NOT_SUPPORTED, "not on this GPU")

    mm = LtMatmul(Refusing(), aligned_empty(WS_BYTES))
    a, b, out = operands(np.random.default_rng(16), *ODD)
    with pytest.raises(LtError) as e:
        mm.gemm(out, a, b)
    assert "refused" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value.__cause__, real.cuBLASLtError)


@pytest.mark.parametrize("case,match", [
    ("dbias with trans_b", "trans_b=False"),
    ("dbias_a without trans_a", "trans_a=True"),
    ("dbias_a with dbias", "alone"),
    ("bf16 dbias", "dtype"),
    ("dbias into bf16 out", "dtype"),
    ("gelu without bias", "needs bias"),
    ("gelu with N % 8", "N % 8"),
    ("batched bias", "2-D"),
    ("shapes", "does not make"),
    ("not contiguous", "C-contiguous"),
    ("fp16", "neither bf16"),
])
def test_bad_arguments(lt, case, match):
    M, K, N = ODD
    rng = np.random.default_rng(17)
    a, b, out = operands(rng, M, K, N)
    f32 = np.dtype(np.float32)
    calls = {
        "dbias with trans_b": lambda: lt.gemm(np.empty((M, K), f32), out, b, trans_b=True, dbias=np.empty(K, f32)),
        "dbias_a without trans_a": lambda: lt.gemm(np.empty((M, N), f32), a, b, dbias_a=np.empty(M, f32)),
        "dbias_a with dbias": lambda: lt.gemm(np.empty((K, N), f32), a, out, trans_a=True, dbias=np.empty(N, f32),
                                              dbias_a=np.empty(K, f32)),
        "bf16 dbias": lambda: lt.gemm(np.empty((K, N), f32), a, out, trans_a=True, dbias=np.empty(N, bf16)),
        "dbias into bf16 out": lambda: lt.gemm(np.empty((K, N), bf16), a, out, trans_a=True, dbias=np.empty(N, f32)),
        "gelu without bias": lambda: lt.gemm(out, a, b, gelu_pre=np.empty_like(out)),
        "gelu with N % 8": lambda: lt.gemm(out[:, :N - 4].copy(), a, b[:, :N - 4].copy(), bias=np.zeros(N - 4, bf16),
                                           gelu_pre=np.empty((M, N - 4), bf16)),
        "batched bias": lambda: lt.gemm(out[None], a[None], b[None], bias=np.zeros(N, bf16)),
        "shapes": lambda: lt.gemm(out, a, b, trans_b=True),
        "not contiguous": lambda: lt.gemm(out, a.T.copy().T, b),
        "fp16": lambda: lt.gemm(out, a.astype(np.float16), b.astype(np.float16)),
    }
    with pytest.raises(ValueError, match=match):
        calls[case]()


def test_the_workspace_is_used_from_its_first_256_byte_aligned_byte(standin):
    ws = aligned_empty(WS_BYTES + 256)[16:]  # like a large numpy allocation: 16-byte aligned
    mm = LtMatmul(standin, ws)
    a, b, out = operands(np.random.default_rng(21), *ODD)
    mm.gemm(out, a, b)
    call = standin.last_matmul
    assert call["workspace"] == ws.ctypes.data + 240 and call["workspace_size"] == ws.nbytes - 240
    assert call["preference"][Pref.MAX_WORKSPACE_BYTES] == ws.nbytes - 240
    mm.close()
    with pytest.raises(ValueError, match="256"):
        LtMatmul(standin, aligned_empty(WS_BYTES)[16:256])


# --- the bindings crystal's module calls ---
CALLS = {  # every cublasLt function crystal.backends.cublaslt calls, with arguments of its kinds
    "create": (),
    "destroy": (1,),
    "matmul_desc_create": (68, 0),
    "matmul_desc_set_attribute": (1, 3, 2, 4),
    "matmul_desc_destroy": (1,),
    "matrix_layout_create": (14, 4, 4, 4),
    "matrix_layout_set_attribute": (1, 5, 2, 4),
    "matrix_layout_destroy": (1,),
    "matmul_preference_create": (),
    "matmul_preference_set_attribute": (1, 1, 2, 8),
    "matmul_preference_destroy": (1,),
    "matmul_algo_get_heuristic": (1, 2, 3, 4, 5, 5, 6, 1, 7, 8),
    "matmul": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 10, 11, 12, 13, 14),
    "get_matmul_desc_attribute_dtype": (3,),
    "get_matrix_layout_attribute_dtype": (5,),
    "get_matmul_preference_attribute_dtype": (1,),
}
NAMES = {"MatmulDescAttribute", "MatrixLayoutAttribute", "MatmulPreferenceAttribute", "Epilogue", "ReductionScheme",
         "cuBLASLtError", "matmul_heuristic_result_dtype"}


def test_every_binding_used_exists_in_nvmath_with_a_signature_that_binds():
    tree = ast.parse(pathlib.Path(inspect.getfile(cublaslt)).read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and ((isinstance(node.value, ast.Name) and node.value.id == "lt")
                 or (isinstance(node.value, ast.Attribute) and node.value.attr == "lt"))}
    assert used == set(CALLS) | NAMES
    for name, args in CALLS.items():
        inspect.signature(getattr(real, name)).bind(*args)
        assert callable(getattr(LtStandIn(), name))
    for name in NAMES:
        assert getattr(LtStandIn, name) is getattr(real, name)  # the stand-in's enums are the real ones
    assert cublaslt.BF16 == 14 and cublaslt.F32 == 0  # CUDA_R_16BF, CUDA_R_32F


def test_the_standin_refuses_what_the_real_bindings_refuse(standin):
    with pytest.raises(TypeError):  # the real signature: (light_handle)
        standin.destroy()
    with pytest.raises(TypeError, match="integer"):  # an array where a pointer goes
        standin.matmul_desc_create(np.zeros(2), 0)
    desc = standin.matmul_desc_create(68, 0)
    four = np.zeros(1, np.int64)
    with pytest.raises(real.cuBLASLtError) as e:  # TRANSA holds an int32_t: 8 bytes are refused
        standin.matmul_desc_set_attribute(desc, int(Desc.TRANSA), four.ctypes.data, 8)
    assert e.value.status == INVALID_VALUE
    standin.matmul_desc_destroy(desc)
    with pytest.raises(real.cuBLASLtError):
        standin.matmul_desc_destroy(desc)


# --- the stand-in's column-major semantics, on its own (raw API calls, Fortran-order arrays) ---
class Raw:
    """Direct calls of the stand-in, as a C program would make them."""

    def __init__(self, standin):
        self.s, self.handle = standin, standin.create()
        self.ws = aligned_empty(WS_BYTES)

    def set(self, setter, dtype_of, obj, attr, value):
        buf = np.array(value, dtype=dtype_of(attr))
        setter(obj, attr, buf.ctypes.data, buf.nbytes)

    def run(self, A, B, D, *, transa=0, transb=0, epilogue=1, bias=None, aux=None, aux_ld=0, alpha=1.0, ld_pad=0,
            bias_type=None):
        """D (Fortran order, m x n) = alpha op(A) op(B) with an epilogue; each matrix's ld padded by ld_pad rows."""
        s = self.s
        desc = s.matmul_desc_create(68, F32)

        def sd(attr, v):
            self.set(s.matmul_desc_set_attribute, s.get_matmul_desc_attribute_dtype, desc, attr, v)

        sd(Desc.TRANSA, transa)
        sd(Desc.TRANSB, transb)
        sd(Desc.EPILOGUE, epilogue)
        if bias is not None:
            sd(Desc.BIAS_POINTER, bias.ctypes.data)
        if bias_type is not None:
            sd(Desc.BIAS_DATA_TYPE, bias_type)
        if aux is not None:
            sd(Desc.EPILOGUE_AUX_POINTER, aux.ctypes.data)
            sd(Desc.EPILOGUE_AUX_LD, aux_ld)
        mats, layouts = [], []
        for M, t in ((A, BF16), (B, BF16), (D, F32 if D.dtype == np.float32 else BF16)):
            rows, cols = M.shape
            ld = rows + ld_pad
            store = np.full((cols, ld), np.nan, M.dtype)  # column-major with padding: column j = store[j]
            store[:, :rows] = M.T
            mats.append(store)
            layouts.append(s.matrix_layout_create(t, rows, cols, ld))
        pref = s.matmul_preference_create()
        self.set(s.matmul_preference_set_attribute, s.get_matmul_preference_attribute_dtype, pref,
                 Pref.MAX_WORKSPACE_BYTES, WS_BYTES)
        results, count = np.zeros(1, real.matmul_heuristic_result_dtype), np.zeros(1, np.int32)
        s.matmul_algo_get_heuristic(self.handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref, 1,
                                    results.ctypes.data, count.ctypes.data)
        assert count[0] == 1
        ab = np.array([alpha, 0.0], np.float32)
        s.matmul(self.handle, desc, ab[:1].ctypes.data, mats[0].ctypes.data, layouts[0], mats[1].ctypes.data,
                 layouts[1], ab[1:].ctypes.data, mats[2].ctypes.data, layouts[2], mats[2].ctypes.data, layouts[2],
                 results.ctypes.data, self.ws.ctypes.data, WS_BYTES, 0)
        D[...] = mats[2][:, :D.shape[0]].T
        assert np.isnan(f64(mats[2][:, D.shape[0]:])).all()  # the padding rows untouched
        for lay in layouts:
            s.matrix_layout_destroy(lay)
        s.matmul_preference_destroy(pref)
        s.matmul_desc_destroy(desc)


@pytest.mark.parametrize("transa,transb", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_standin_column_major_semantics(standin, transa, transb):
    m, n, k = 5, 7, 3
    rng = np.random.default_rng(18)
    opA, opB = rand(rng, (m, k), ints=3), rand(rng, (k, n), ints=3)
    raw = Raw(standin)
    D = np.empty((m, n), np.float32)
    raw.run(opA.T if transa else opA, opB.T if transb else opB, D, transa=transa, transb=transb, alpha=2.0, ld_pad=3)
    np.testing.assert_array_equal(D, 2 * f64(opA) @ f64(opB))


def test_standin_epilogues_on_their_own(standin):
    m, n, k = 8, 4, 3
    rng = np.random.default_rng(19)
    A, B = rand(rng, (m, k), ints=3), rand(rng, (k, n), ints=3)
    raw, exact = Raw(standin), f64(A) @ f64(B)
    bias = rand(rng, (m,), np.float32, ints=3)
    D = np.empty((m, n), np.float32)
    raw.run(A, B, D, epilogue=int(real.Epilogue.BIAS), bias=bias)  # bias along D's rows
    np.testing.assert_array_equal(D, exact + f64(bias)[:, None])
    aux = np.full((n, 16), np.nan, np.float32)  # column-major, ld 16
    raw.run(A, B, D, epilogue=int(real.Epilogue.GELU_AUX_BIAS), bias=bias, aux=aux, aux_ld=16)
    np.testing.assert_array_equal(aux[:, :m].T, exact + f64(bias)[:, None])
    assert rel_err(D, gelu64(exact + f64(bias)[:, None])) <= 1e-6
    grad = np.full(m, np.nan, np.float32)
    raw.run(A, B, D, epilogue=int(real.Epilogue.BGRADA), bias=grad)  # sums over k of op(A)
    np.testing.assert_array_equal(grad, f64(A).sum(1))
    grad = np.full(n, np.nan, np.float32)
    raw.run(A, B.T.copy(), D, transb=1, epilogue=int(real.Epilogue.BGRADB), bias=grad)  # of op(B)
    np.testing.assert_array_equal(grad, f64(B).sum(0))
    for epi, kw, status in ((real.Epilogue.BGRADA, dict(transa=1), NOT_SUPPORTED),
                            (real.Epilogue.BGRADB, dict(transb=0), NOT_SUPPORTED)):
        with pytest.raises(real.cuBLASLtError) as e:
            raw.run(A.T.copy() if kw.get("transa") else A, B, D, epilogue=int(epi), bias=grad, **kw)
        assert e.value.status == status
    with pytest.raises(real.cuBLASLtError) as e:  # GELU aux ld below m
        raw.run(A, B, D, epilogue=int(real.Epilogue.GELU_AUX_BIAS), bias=bias, aux=aux, aux_ld=4)
    assert e.value.status == INVALID_VALUE


def test_standin_bias_gradient_has_the_output_type_as_cublaslt_h_documents(standin):
    """cublasLt.h (cuBLAS 13.10), CUBLASLT_MATMUL_DESC_BIAS_POINTER: "Bias gradient vector elements
    are the same type as the output elements (Ctype)": crystal's dW product, bf16 A/B into fp32
    C/D with BGRADA, writes an fp32 bias gradient; a bf16 one is not in the table."""
    rng = np.random.default_rng(30)
    m, k, n = 6, 5, 4
    A, B, D = rand(rng, (m, k), ints=3), rand(rng, (k, n), ints=3), np.zeros((m, n), np.float32)
    raw = Raw(standin)
    grad = np.full(m, np.nan, np.float32)
    raw.run(A, B, D, epilogue=int(real.Epilogue.BGRADA), bias=grad, bias_type=F32)
    np.testing.assert_array_equal(grad, f64(A).sum(1))
    with pytest.raises(real.cuBLASLtError) as e:
        raw.run(A, B, D, epilogue=int(real.Epilogue.BGRADA), bias=np.zeros(m, bf16), bias_type=BF16)
    assert e.value.status == NOT_SUPPORTED


# --- under a capture (tests/emu/device.py): the product joins the graph of its stream ---


def test_standin_records_a_product_made_during_a_capture_and_replays_it_on_the_values_then(standin, lt):
    rng = np.random.default_rng(31)
    a, b, out = operands(rng, *ODD, ints=3, out_dtype=np.dtype(np.float32))
    record = standin.device.captured(STREAM, lambda: lt.gemm(out, a, b))
    assert np.isnan(out).all()  # captured, not run
    a[...] = rand(rng, a.shape, ints=3)  # the next step's values, in the same memory
    for fn, args, kwargs in record:
        fn(*args, **kwargs)
    np.testing.assert_array_equal(out, f64(a) @ f64(b))


def test_standin_refuses_a_product_on_another_stream_than_the_one_captured(standin, lt):
    a, b, out = operands(np.random.default_rng(32), *ODD)
    with pytest.raises(StreamCaptureError, match=f"stream {STREAM} while this thread captures"):
        standin.device.captured(STREAM + 1, lambda: lt.gemm(out, a, b))
