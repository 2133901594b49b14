"""BLAS gemm callable from numba kernels: so a cpu op is one nogil call, products included.

An op that calls NumPy's matmul returns to Python (and takes the GIL) around every product;
with several sphere threads that hand-off is where they wait on each other. Here the kernels
call the same CBLAS that NumPy links (found through threadpoolctl, so the BLAS thread limit
and the summation order are NumPy's) by symbol: `gemm(...)` compiles to a direct call to
`crystal_cblas_sgemm` / `crystal_cblas_dgemm`, which `llvmlite.binding.add_symbol` binds to
the library's function when this module is imported. The address is looked up at load time,
not baked into the code, so numba's on-disk cache stays valid across processes.

The symbols take 64-bit integers (ILP64, as NumPy's scipy-openblas64 does). For a 32-bit
integer BLAS (LP64) they point at a small numba cfunc that narrows the integers and calls it.
Where threadpoolctl sees no BLAS in the process (NumPy on Apple's Accelerate), a system CBLAS
found by name is used instead.
"""

from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numpy as np
from numba import cfunc, types
from numba.extending import overload

from crystal.errors import CrystalError

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

# (symbol, 64-bit integers?) in the order tried; {} is s or d.
_NAMES = (("scipy_cblas_{}gemm64_", True), ("cblas_{}gemm64_", True), ("cblas_{}gemm_64", True),
          ("scipy_cblas_{}gemm", False), ("cblas_{}gemm", False))

_I, _P = types.int64, types.uintp  # dimensions and leading dimensions; data pointers


def _signature(real):
    """cblas_?gemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)."""
    return types.void(types.int32, types.int32, types.int32, _I, _I, _I, real, _P, _I, _P, _I, real, _P, _I)


_sgemm = types.ExternalFunction("crystal_cblas_sgemm", _signature(types.float32))
_dgemm = types.ExternalFunction("crystal_cblas_dgemm", _signature(types.float64))


def gemm(trans_a, trans_b, M, N, K, A, a_off, lda, B, b_off, ldb, beta, C, c_off, ldc):
    """C[M,N] = op(A)[M,K] @ op(B)[K,N] + beta C, row-major, in numba kernels only.

    A, B, C are arrays of one dtype (float32 or float64); each matrix starts at element
    offset *_off of its array and has leading dimension ld* (the row stride, in elements);
    op(X) = X.T where trans_x. No bounds are checked: the caller's shapes must be right."""
    raise NotImplementedError("gemm is compiled into numba kernels; call it from one")


@overload(gemm, jit_options={"nogil": True})
def _gemm(trans_a, trans_b, M, N, K, A, a_off, lda, B, b_off, ldb, beta, C, c_off, ldc):
    if C.dtype == types.float32:
        fn, real = _sgemm, np.float32
    elif C.dtype == types.float64:
        fn, real = _dgemm, np.float64
    else:
        return None

    def impl(trans_a, trans_b, M, N, K, A, a_off, lda, B, b_off, ldb, beta, C, c_off, ldc):
        size = C.itemsize
        fn(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, M, N, K,
           real(1.0), A.ctypes.data + a_off * size, lda, B.ctypes.data + b_off * size, ldb,
           real(beta), C.ctypes.data + c_off * size, ldc)

    return impl


# --- binding the symbols ---------------------------------------------------------------------

def lp64_adapter(address: int, dtype):
    """A cfunc with the ILP64 signature that calls the LP64 gemm at `address` (keep it alive)."""
    real = ctypes.c_float if np.dtype(dtype) == np.float32 else ctypes.c_double
    i32, ptr = ctypes.c_int32, ctypes.c_size_t
    target = ctypes.CFUNCTYPE(None, i32, i32, i32, i32, i32, i32, real, ptr, i32, ptr, i32, real, ptr, i32)(address)
    nb_real = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    n = np.int32

    @cfunc(_signature(nb_real), nopython=True)
    def adapter(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
        target(order, ta, tb, n(M), n(N), n(K), alpha, A, n(lda), B, n(ldb), beta, C, n(ldc))

    return adapter


def _blas_paths():
    """Loaded BLAS libraries (NumPy's own first), then system CBLAS libraries by name (looked
    up only when the loaded ones lack a gemm: find_library runs ldconfig)."""
    import ctypes.util

    from threadpoolctl import threadpool_info

    np.ones((2, 2)) @ np.ones((2, 2))  # NumPy loads its BLAS lazily on some builds
    libs = [lib["filepath"] for lib in threadpool_info() if lib.get("user_api") == "blas" and lib.get("filepath")]
    yield from sorted(libs, key=lambda path: "numpy" not in path)
    for name in ("Accelerate", "openblas", "cblas", "blas", "mkl_rt"):
        path = ctypes.util.find_library(name)
        if path:
            yield path


def _find_gemm(letter: str):
    """(address, ilp64) of ?gemm in the first library of _blas_paths() that has it, or None."""
    for path in _blas_paths():
        try:
            handle = ctypes.CDLL(path)
        except OSError:
            continue
        for name, ilp64 in _NAMES:
            fn = getattr(handle, name.format(letter), None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value, ilp64
    return None


class _Binding:
    """Binds crystal_cblas_?gemm once per process; holds the LP64 adapters alive."""

    def __init__(self):
        self.adapters = []
        self.source = {}
        for letter, dtype in (("s", np.float32), ("d", np.float64)):
            found = _find_gemm(letter)
            if found is None:
                raise CrystalError("the cpu backend needs NumPy linked to a CBLAS (OpenBLAS, MKL or "
                                   f"BLIS; PyPI's NumPy wheels are); no {letter}gemm was found in its BLAS")
            address, ilp64 = found
            if not ilp64:
                adapter = lp64_adapter(address, dtype)
                self.adapters.append(adapter)
                address = adapter.address
            llvm.add_symbol(f"crystal_cblas_{letter}gemm", address)
            self.source[letter] = "ilp64" if ilp64 else "lp64 via adapter"


BINDING = _Binding()
