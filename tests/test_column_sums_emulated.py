"""The column sums of the parameter gradients (layernorm's dw, db and a matmul's dbias), run on
the CPU under emulation: two launches, partial sums over column_parts(N) parts of the rows,
then a fixed-order sum of the parts by a warp per column (kernels/column_reduce.cuh).

They match the cpu ops at odd shapes (rows not a multiple of a part, 1, 7 and 768 columns, more
parts than a warp has lanes, the cap on the parts), in fp32 and bf16; their bits depend on the
inputs and shapes alone (not the block size, the thread or the sphere count); the cuda backend
allocates their scratch once per thread and shape, never inside a CUDA-graph capture.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from crystal.backends import cpu
from crystal.backends.cpu import CpuBackend
from crystal.backends.kernels import COLUMN_PARTS_MAX, COLUMN_ROWS, cdiv, column_parts
from crystal.errors import GraphCaptureError
from compare import rel_err
from emu.backend import EmulatedCudaBackend
from emu.coverage import gpu, launch_column_sums
from lt_standin import LtStandIn

TOL = 1e-5  # float32 sums in another order than the cpu op's
be = CpuBackend()

# (N, C): rows not a multiple of a part; more parts than a warp's 32 lanes; GPT-2's width
SHAPES = [(131, 1), (131, 7), (2117, 7), (150, 768)]


def inputs(N: int, C: int, precision: str, seed: int = 7):
    """dout, inp (activation dtype) and mean, rstd of inp, from the cpu layernorm forward."""
    rng = np.random.default_rng(seed)
    dout, inp = rng.standard_normal((N, C)), rng.standard_normal((N, C)) * 2.0 + 0.5
    act = ml_dtypes.bfloat16 if precision == "bf16" else np.float32
    dout, inp = (np.ascontiguousarray(x.astype(np.float32).astype(act)) for x in (dout, inp))
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    be.layernorm_forward(np.empty((N, C), np.float32), mean, rstd, inp.astype(np.float32),
                         np.ones(C, np.float32), np.zeros(C, np.float32), 1e-5)
    return dout, inp, mean, rstd


def kernel_name(name: str, precision: str) -> str:
    return name + "_bf16" if precision == "bf16" else name


def emulated_dwdb(dout, inp, mean, rstd, precision, block=32):
    N, C = dout.shape
    dw, db = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
    launch_column_sums("layernorm_backward_dwdb", block, (dw, db), (dout, inp, mean, rstd), N, C,
                       launch_partial=twin_launcher(precision))
    return dw, db


def emulated_dbias(dout, precision, block=32):
    N, OC = dout.shape
    dbias = np.full(OC, np.nan, np.float32)
    launch_column_sums("bias_backward", block, (dbias,), (dout,), N, OC, launch_partial=twin_launcher(precision))
    return dbias


def twin_launcher(precision: str):
    """Launches a `_partial` kernel of this precision (its `_bf16` twin for bf16 inputs)."""
    return lambda name, grid, block, *args: gpu().launch(kernel_name(name, precision), grid, block, *args)


def cpu_dwdb(dout, inp, mean, rstd):
    N, C = dout.shape
    dw, db = np.empty(C, np.float32), np.empty(C, np.float32)
    be.layernorm_backward(np.zeros((N, C), np.float32), dw, db, dout.astype(np.float32), inp.astype(np.float32),
                          np.ones(C, np.float32), mean, rstd)
    return dw, db


# --- against the cpu ops --------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("N, C", SHAPES)
def test_layernorm_dw_db_emulated_match_the_cpu_op(N, C, precision):
    dout, inp, mean, rstd = inputs(N, C, precision)
    dw, db = emulated_dwdb(dout, inp, mean, rstd, precision, block=64 if C > 64 else 32)
    e_dw, e_db = cpu_dwdb(dout, inp, mean, rstd)
    assert rel_err(dw, e_dw) <= TOL
    assert rel_err(db, e_db) <= TOL


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("N, C", SHAPES)
def test_bias_gradient_emulated_matches_the_cpu_op(N, C, precision):
    dout = inputs(N, C, precision)[0]
    expected = np.empty(C, np.float32)
    cpu.bias_backward(expected, dout.astype(np.float32))
    assert rel_err(emulated_dbias(dout, precision, block=64 if C > 64 else 32), expected) <= TOL


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_column_sums_over_more_rows_than_the_parts_cover_are_exact_where_the_sum_is(precision):
    """Past COLUMN_PARTS_MAX parts, parts grow beyond COLUMN_ROWS rows and the last ones are
    empty. Eighths in [-4, 4] add exactly in float32 at any order: the cpu op's bits."""
    N = COLUMN_PARTS_MAX * COLUMN_ROWS + 4465  # 1024 parts of 69 rows: the last 9 are empty
    assert column_parts(N) == COLUMN_PARTS_MAX and (COLUMN_PARTS_MAX - 1) * cdiv(N, COLUMN_PARTS_MAX) > N
    rng = np.random.default_rng(3)
    act = ml_dtypes.bfloat16 if precision == "bf16" else np.float32
    dout = (rng.integers(-32, 33, (N, 1)) / 8).astype(np.float32).astype(act)
    expected = np.empty(1, np.float32)
    cpu.bias_backward(expected, dout.astype(np.float32))
    assert emulated_dbias(dout, precision).tobytes() == expected.tobytes()
    _, inp, mean, rstd = inputs(N, 1, precision)
    assert emulated_dwdb(dout, inp, mean, rstd, precision)[1].tobytes() == expected.tobytes()


# --- the bits depend on the inputs and shapes alone ---------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_column_sums_emulated_bits_do_not_depend_on_the_block_size(precision):
    dout, inp, mean, rstd = inputs(2117, 7, precision)
    runs = [(*emulated_dwdb(dout, inp, mean, rstd, precision, block), emulated_dbias(dout, precision, block))
            for block in (32, 64, 128)]
    assert all(b.tobytes() == a.tobytes() for run in runs[1:] for a, b in zip(runs[0], run))


def test_bias_gradient_emulated_adds_in_the_documented_order():
    """Part r holds rows [r k, (r+1) k), k = cdiv(N, P), added in order; lane l adds parts l,
    l + 32, ... in order; then xor-shuffles over 16, 8, 4, 2, 1 lanes. Only float additions:
    a GPU gives these bits too."""
    N, C = 2117, 7
    dout = inputs(N, C, "fp32")[0]
    P = column_parts(N)
    k = cdiv(N, P)
    parts = np.zeros((P, C), np.float32)
    for r in range(P):
        for i in range(r * k, min(N, (r + 1) * k)):
            parts[r] += dout[i]
    lanes = np.zeros((32, C), np.float32)
    for lane in range(32):
        for r in range(lane, P, 32):
            lanes[lane] += parts[r]
    for o in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[np.arange(32) ^ o]
    assert emulated_dbias(dout, "fp32").tobytes() == lanes[0].tobytes()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backend_column_sums_are_bitwise_the_same_on_1_and_3_sphere_threads(precision):
    """Each sphere thread has its own partials; three at once give one thread's bits (the
    training runs of 1 and 3 spheres in test_cuda_backend_emulated.py and test_bf16_emulated.py
    compare whole steps, on micro-batches of one part)."""
    N, C = 131, 7  # three parts
    bf16 = precision == "bf16"
    gpu_be = EmulatedCudaBackend("bf16", lt=LtStandIn()) if bf16 else EmulatedCudaBackend()
    dout, inp, mean, rstd = inputs(N, C, precision)

    def run():
        dw, db, dbias = (np.full(C, np.nan, np.float32) for _ in range(3))
        gpu_be.layernorm_backward(np.zeros((N, C), dout.dtype), dw, db, dout, inp, np.ones(C, dout.dtype), mean,
                                  rstd)
        if not bf16:  # bf16: the bias gradient comes from the cuBLASLt product's epilogue
            gpu_be.matmul_backward(np.empty((N, C), np.float32), np.empty((C, C), np.float32), dbias, dout, inp,
                                   np.ones((C, C), np.float32))
        return dw.tobytes() + db.tobytes() + dbias.tobytes()

    alone, results = run(), [None] * 3

    def sphere(i):
        results[i] = run()

    threads = [threading.Thread(target=sphere, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [alone] * 3


# --- scratch: allocated once, outside any capture ------------------------------------------------

def layernorm_backward_call(backend, N=131, C=7):
    """A layernorm backward on device arrays of `backend`, to call (again), and its dw, db."""
    dout, inp, mean, rstd = (backend.to_device(x) for x in inputs(N, C, "fp32"))
    dw, db, dinp, w = backend.empty((C,)), backend.empty((C,)), backend.zeros((N, C)), backend.to_device(np.ones(C, np.float32))
    return (lambda: backend.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd)), dw, db


def test_column_sums_reuse_their_partials_and_a_capture_of_them_allocates_nothing():
    backend = EmulatedCudaBackend(graphs=True)
    call, dw, db = layernorm_backward_call(backend)
    call()
    eager = dw.tobytes() + db.tobytes()
    dw[:], db[:] = np.nan, np.nan
    with backend.sphere_context(0):  # a capture needs a stream of its own, as crystal.graphs gives it
        backend.begin_capture()
        call()  # the partials of the eager call: nothing allocated
        graph = backend.end_capture()
        backend.launch_graph(graph)
    assert dw.tobytes() + db.tobytes() == eager


def test_column_sums_first_used_inside_a_capture_are_refused():
    backend = EmulatedCudaBackend(graphs=True)
    call, _, _ = layernorm_backward_call(backend)
    with backend.sphere_context(0):
        backend.begin_capture()
        try:
            with pytest.raises(GraphCaptureError, match="first use of a column_partials buffer"):
                call()
        finally:
            backend.end_capture()
