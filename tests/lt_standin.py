"""A numpy stand-in for nvmath.bindings.cublasLt: cuBLASLt's call semantics on host memory.

`LtStandIn()` exposes the cublasLt functions crystal.backends.cublaslt calls, with the real
bindings' names and signatures (every call is first bound to the real function's signature,
and every argument must be an integer, as the Cython bindings' C integers and pointers are),
plus the real enums and record dtypes. Handles and descriptors are opaque integers; attribute
buffers are read from their pointers with the dtype the real get_*_attribute_dtype gives, and
a size that does not match it is refused as cuBLASLt refuses it.

matmul computes cuBLASLt's D = alpha op(A) op(B) + beta C on column-major matrices read from
raw memory at the given pointers (rows, cols, ld, batch count and stride from the layouts),
in float32 from bf16/fp32 inputs, applies the epilogue (BIAS, GELU[_AUX][_BIAS], BGRADA,
BGRADB), rounds D, the GELU aux and the bias gradient to their types (bf16: round to nearest
even), and writes them back. What a real cuBLASLt refuses, the stand-in refuses with the same
status (a cuBLASLtError subclass): types outside cuBLASLt's table for COMPUTE_32F (A/B bf16
with C/D bf16 or fp32, or all fp32; the bias type = C's), inconsistent dimensions, ld below
the rows, GELU aux ld below m or not a multiple of 8, an aux type other than D's, BGRADA with
op(A) = T and BGRADB with op(B) = N (an RTX 3060's cuBLASLt 13.0 answers NOT_SUPPORTED), an
algorithm used for another problem, a workspace smaller than the algorithm asks or not
256-byte aligned, pointers less aligned than the heuristic was told (up to 16 bytes).
What it does not model (ROW order, batched epilogues, other epilogues, pointer modes, the
implicit heuristic of algo = NULL) raises NotImplementedError.

matmul issues its device work through the stand-in's `device` (tests/emu/device.py): run now,
or, while the calling thread captures a stream, recorded into that capture (a product sent to
another stream than the captured one is refused) and replayed with the addresses, alpha and beta
given at capture time.

The last matmul is kept (`last_matmul`: handle, descriptor, layouts, preference, algorithm,
workspace, stream, alpha, beta, pointers) and each function's calls are counted (`counts`).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import inspect
import itertools
import operator
import threading
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from nvmath import CudaDataType
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as real

from emu.device import EmulatedDevice

BF16, F32 = int(CudaDataType.CUDA_R_16BF), int(CudaDataType.CUDA_R_32F)
NP_TYPE = {BF16: np.dtype(ml_dtypes.bfloat16), F32: np.dtype(np.float32)}
COMPUTE_32F = int(cublas.ComputeType.COMPUTE_32F)
OP_N, OP_T = int(cublas.Operation.N), int(cublas.Operation.T)
SUCCESS, NOT_INITIALIZED, INVALID_VALUE, NOT_SUPPORTED = (
    int(cublas.Status.SUCCESS), int(cublas.Status.NOT_INITIALIZED), int(cublas.Status.INVALID_VALUE),
    int(cublas.Status.NOT_SUPPORTED))
# cuBLASLt's table for COMPUTE_32F, scale fp32: (A/B type, C/D type) -> the bias type, which is
# the output's (cublasLt.h, cuBLAS 13.10: CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE "Bias vector elements
# are the same type as the elements of output matrix (Dtype)"; CUBLASLT_MATMUL_DESC_BIAS_POINTER
# "Bias gradient vector elements are the same type as the output elements (Ctype)")
SUPPORTED_TYPES = {(BF16, BF16): BF16, (BF16, F32): F32, (F32, F32): F32}
MAX_ALGO_ALIGN = 16  # the widest access a kernel makes (128 bits): alignment beyond it is not required

DescAttr, LayoutAttr, PrefAttr = real.MatmulDescAttribute, real.MatrixLayoutAttribute, real.MatmulPreferenceAttribute
Epi = real.Epilogue
DESC_DEFAULTS = {
    DescAttr.POINTER_MODE: 0, DescAttr.TRANSA: OP_N, DescAttr.TRANSB: OP_N, DescAttr.TRANSC: OP_N,
    DescAttr.EPILOGUE: int(Epi.DEFAULT), DescAttr.BIAS_POINTER: 0, DescAttr.BIAS_BATCH_STRIDE: 0,
    DescAttr.BIAS_DATA_TYPE: -1, DescAttr.EPILOGUE_AUX_POINTER: 0, DescAttr.EPILOGUE_AUX_LD: 0,
    DescAttr.EPILOGUE_AUX_BATCH_STRIDE: 0, DescAttr.EPILOGUE_AUX_DATA_TYPE: -1,
}
LAYOUT_DEFAULTS = {LayoutAttr.ORDER: int(real.Order.COL), LayoutAttr.BATCH_COUNT: 1,
                   LayoutAttr.STRIDED_BATCH_OFFSET: 0}
PREF_DEFAULTS = {
    PrefAttr.SEARCH_MODE: 0, PrefAttr.MAX_WORKSPACE_BYTES: 0,
    PrefAttr.REDUCTION_SCHEME_MASK: int(real.ReductionScheme.MASK),
    PrefAttr.MIN_ALIGNMENT_A_BYTES: 256, PrefAttr.MIN_ALIGNMENT_B_BYTES: 256, PrefAttr.MIN_ALIGNMENT_C_BYTES: 256,
    PrefAttr.MIN_ALIGNMENT_D_BYTES: 256, PrefAttr.MAX_WAVES_COUNT: 0.0, PrefAttr.IMPL_MASK: (1 << 64) - 1,
}
GELU_EPILOGUES = {int(Epi.GELU), int(Epi.GELU_AUX), int(Epi.GELU_BIAS), int(Epi.GELU_AUX_BIAS)}
AUX_EPILOGUES = {int(Epi.GELU_AUX), int(Epi.GELU_AUX_BIAS)}
BIAS_EPILOGUES = {int(Epi.BIAS), int(Epi.GELU_BIAS), int(Epi.GELU_AUX_BIAS)}
BGRAD_EPILOGUES = {int(Epi.BGRADA), int(Epi.BGRADB)}
MODELED_EPILOGUES = {int(Epi.DEFAULT)} | GELU_EPILOGUES | BIAS_EPILOGUES | BGRAD_EPILOGUES


class StandInError(real.cuBLASLtError):
    """The real cuBLASLtError, made without the library (whose __init__ asks it for the status name)."""

    def __init__(self, status: int, why: str):
        Exception.__init__(self, f"{cublas.Status(status).name}: {why}")
        self.status = status


def _bound(fn):
    """Bind each call to the real binding's signature (a wrong call fails here as on a GPU) and
    check every argument is an integer (the bindings take C integers and pointers only)."""
    sig = inspect.signature(getattr(real, fn.__name__))

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            try:
                operator.index(value)
            except TypeError:
                raise TypeError(f"cublasLt.{fn.__name__}: {name} must be an integer, got {type(value).__name__}") \
                    from None
        with self._lock:
            self.counts[fn.__name__] += 1
        return fn(self, **{k: int(v) for k, v in bound.arguments.items()})

    return call


def _raw(ptr: int, dtype: np.dtype, count: int) -> np.ndarray:
    """`count` elements of `dtype` at host address ptr, as a writable numpy array (no copy)."""
    if ptr == 0:
        raise StandInError(INVALID_VALUE, "a NULL pointer where memory is read or written")
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype)


def _matrices(ptr: int, type_: int, rows: int, cols: int, ld: int, batch: int, stride: int) -> np.ndarray:
    """The [batch, rows, cols] column-major matrices at ptr (leading dimension ld, `stride`
    elements between matrices) as a strided view of that memory."""
    dt = NP_TYPE[type_]
    extent = (batch - 1) * stride + (cols - 1) * ld + rows  # elements from the first to the last
    flat = _raw(ptr, dt, extent)
    return np.lib.stride_tricks.as_strided(flat, (batch, rows, cols), (stride * dt.itemsize, dt.itemsize,
                                                                       ld * dt.itemsize), writeable=True)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """cuBLASLt's GELU, in x's precision: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = x.dtype.type(np.sqrt(2.0 / np.pi))
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def _alignment(ptr: int) -> int:
    return 1 << 30 if ptr == 0 else ptr & -ptr


@dataclass
class Problem:
    """One matmul as cuBLASLt sees it, validated: what an algorithm is chosen for."""

    m: int
    n: int
    k: int
    batch: int
    transa: int
    transb: int
    ab_type: int
    cd_type: int
    epilogue: int
    bias_type: int
    aux_ld: int

    def signature(self) -> tuple:
        return (self.m, self.n, self.k, self.batch, self.transa, self.transb, self.ab_type, self.cd_type,
                self.epilogue, self.bias_type, self.aux_ld)


@dataclass
class Algo:
    """A heuristic's answer: the problem it is for, the alignments it assumes, its workspace."""

    problem: tuple
    alignments: dict
    workspace_size: int
    preference: dict = field(default_factory=dict)


class LtStandIn:
    """nvmath.bindings.cublasLt on host memory (see the module docstring). n_algos: how many
    algorithms the heuristic finds (0: none); algo_workspace: the workspace each one asks for
    (bounded by the preference's MAX_WORKSPACE_BYTES)."""

    # the real enums and records
    MatmulDescAttribute, MatrixLayoutAttribute, MatmulPreferenceAttribute = DescAttr, LayoutAttr, PrefAttr
    Epilogue, ReductionScheme, Order, PointerMode = real.Epilogue, real.ReductionScheme, real.Order, real.PointerMode
    cuBLASLtError = real.cuBLASLtError
    matmul_heuristic_result_dtype = real.matmul_heuristic_result_dtype
    matmul_algo_dtype = real.matmul_algo_dtype
    get_matmul_desc_attribute_dtype = staticmethod(real.get_matmul_desc_attribute_dtype)
    get_matrix_layout_attribute_dtype = staticmethod(real.get_matrix_layout_attribute_dtype)
    get_matmul_preference_attribute_dtype = staticmethod(real.get_matmul_preference_attribute_dtype)

    def __init__(self, n_algos: int = 1, algo_workspace: int = 1 << 20, device=None):
        self.device = device or EmulatedDevice()  # streams and memory (an emulated backend sets its own)
        self.n_algos = n_algos
        self.algo_workspace = algo_workspace
        self.counts: collections.Counter = collections.Counter()
        self.last_matmul: dict | None = None
        self._objects: dict[int, tuple[str, dict]] = {}  # opaque id -> (kind, attributes)
        self._algos: dict[int, Algo] = {}
        self._ids = itertools.count(0x7000_0000_1000, 0x40)
        self._lock = threading.Lock()  # spheres are threads: one stand-in may serve several handles

    # --- objects ---
    def _new(self, kind: str, attrs: dict) -> int:
        with self._lock:
            obj = next(self._ids)
            self._objects[obj] = (kind, attrs)
        return obj

    def _get(self, obj: int, kind: str) -> dict:
        entry = self._objects.get(obj)
        if entry is None or entry[0] != kind:
            raise StandInError(NOT_INITIALIZED if kind == "handle" else INVALID_VALUE,
                               f"{obj:#x} is not a live {kind}")
        return entry[1]

    def _destroy(self, obj: int, kind: str) -> None:
        self._get(obj, kind)
        with self._lock:
            del self._objects[obj]

    def live(self) -> collections.Counter:
        """The live objects by kind (handle, desc, layout, pref): for tests of teardown."""
        return collections.Counter(kind for kind, _ in self._objects.values())

    def attributes(self, obj: int) -> dict:
        """A copy of a live object's attributes, by their enum: for tests."""
        return dict(self._objects[obj][1])

    @staticmethod
    def _set(attrs: dict, enum, dtype_of, attr: int, buf: int, size: int) -> None:
        try:
            key = enum(attr)
        except ValueError:
            raise StandInError(INVALID_VALUE, f"attribute {attr} is not a {enum.__name__}") from None
        dt = np.dtype(dtype_of(key))
        if size != dt.itemsize:  # cuBLASLt: sizeInBytes must match the attribute's storage
            raise StandInError(INVALID_VALUE, f"{key.name}: {size} bytes given, the attribute holds {dt.itemsize}")
        attrs[key] = _raw(buf, dt, 1)[0].item()

    # --- handle ---
    @_bound
    def create(self) -> int:
        return self._new("handle", {})

    @_bound
    def destroy(self, light_handle: int) -> None:
        self._destroy(light_handle, "handle")

    # --- matmul descriptor ---
    @_bound
    def matmul_desc_create(self, compute_type: int, scale_type: int) -> int:
        return self._new("desc", {DescAttr.COMPUTE_TYPE: compute_type, DescAttr.SCALE_TYPE: scale_type,
                                  **DESC_DEFAULTS})

    @_bound
    def matmul_desc_set_attribute(self, matmul_desc: int, attr: int, buf: int, size_in_bytes: int) -> None:
        self._set(self._get(matmul_desc, "desc"), DescAttr, real.get_matmul_desc_attribute_dtype, attr, buf,
                  size_in_bytes)

    @_bound
    def matmul_desc_destroy(self, matmul_desc: int) -> None:
        self._destroy(matmul_desc, "desc")

    # --- matrix layouts ---
    @_bound
    def matrix_layout_create(self, type: int, rows: int, cols: int, ld: int) -> int:  # noqa: A002 (real name)
        return self._new("layout", {LayoutAttr.TYPE: type, LayoutAttr.ROWS: rows, LayoutAttr.COLS: cols,
                                    LayoutAttr.LD: ld, **LAYOUT_DEFAULTS})

    @_bound
    def matrix_layout_set_attribute(self, mat_layout: int, attr: int, buf: int, size_in_bytes: int) -> None:
        self._set(self._get(mat_layout, "layout"), LayoutAttr, real.get_matrix_layout_attribute_dtype, attr, buf,
                  size_in_bytes)

    @_bound
    def matrix_layout_destroy(self, mat_layout: int) -> None:
        self._destroy(mat_layout, "layout")

    # --- preference ---
    @_bound
    def matmul_preference_create(self) -> int:
        return self._new("pref", dict(PREF_DEFAULTS))

    @_bound
    def matmul_preference_set_attribute(self, pref: int, attr: int, buf: int, size_in_bytes: int) -> None:
        self._set(self._get(pref, "pref"), PrefAttr, real.get_matmul_preference_attribute_dtype, attr, buf,
                  size_in_bytes)

    @_bound
    def matmul_preference_destroy(self, pref: int) -> None:
        self._destroy(pref, "pref")

    # --- the problem both the heuristic and matmul validate ---
    def _problem(self, desc: dict, layouts: tuple[dict, dict, dict, dict]) -> Problem:
        unknown = set(desc) - set(DESC_DEFAULTS) - {DescAttr.COMPUTE_TYPE, DescAttr.SCALE_TYPE}
        unknown |= {a for lay in layouts for a in lay} - set(LAYOUT_DEFAULTS) - {
            LayoutAttr.TYPE, LayoutAttr.ROWS, LayoutAttr.COLS, LayoutAttr.LD}
        if unknown:
            raise NotImplementedError(f"stand-in: attributes not modeled: {sorted(a.name for a in unknown)}")
        if desc[DescAttr.COMPUTE_TYPE] != COMPUTE_32F or desc[DescAttr.SCALE_TYPE] != F32:
            raise StandInError(NOT_SUPPORTED, "the stand-in models COMPUTE_32F with fp32 scale only")
        if desc[DescAttr.POINTER_MODE] != 0:
            raise NotImplementedError("stand-in: pointer modes other than HOST")
        A, B, C, D = layouts
        if any(lay[LayoutAttr.ORDER] != int(real.Order.COL) for lay in layouts):
            raise NotImplementedError("stand-in: column-major (ORDER COL) layouts only")
        ab, cd = A[LayoutAttr.TYPE], D[LayoutAttr.TYPE]
        if B[LayoutAttr.TYPE] != ab or C[LayoutAttr.TYPE] != cd or (ab, cd) not in SUPPORTED_TYPES:
            raise StandInError(NOT_SUPPORTED, f"types A {A[LayoutAttr.TYPE]} B {B[LayoutAttr.TYPE]} "
                                              f"C {C[LayoutAttr.TYPE]} D {cd} are not in cuBLASLt's table")
        transa, transb = desc[DescAttr.TRANSA], desc[DescAttr.TRANSB]
        if transa not in (OP_N, OP_T) or transb not in (OP_N, OP_T):
            raise StandInError(NOT_SUPPORTED, "transposes other than N and T")
        m, k = (A[LayoutAttr.COLS], A[LayoutAttr.ROWS]) if transa == OP_T else (A[LayoutAttr.ROWS], A[LayoutAttr.COLS])
        kb, n = (B[LayoutAttr.COLS], B[LayoutAttr.ROWS]) if transb == OP_T else (B[LayoutAttr.ROWS], B[LayoutAttr.COLS])
        if kb != k or any((lay[LayoutAttr.ROWS], lay[LayoutAttr.COLS]) != (m, n) for lay in (C, D)):
            raise StandInError(INVALID_VALUE, f"op(A) {m}x{k}, op(B) {kb}x{n}, C/D "
                                              f"{[(lay[LayoutAttr.ROWS], lay[LayoutAttr.COLS]) for lay in (C, D)]}")
        if any(lay[LayoutAttr.LD] < max(1, lay[LayoutAttr.ROWS]) for lay in layouts):
            raise StandInError(INVALID_VALUE, "a leading dimension below its matrix's rows")
        batches = {lay[LayoutAttr.BATCH_COUNT] for lay in layouts}
        if len(batches) != 1 or min(batches) < 1:
            raise StandInError(INVALID_VALUE, f"batch counts {sorted(batches)}")
        batch = batches.pop()

        epi = desc[DescAttr.EPILOGUE]
        if epi not in MODELED_EPILOGUES:
            raise NotImplementedError(f"stand-in: epilogue {epi}")
        if epi != int(Epi.DEFAULT) and batch > 1:
            raise NotImplementedError("stand-in: batched epilogues")
        bias_type = desc[DescAttr.BIAS_DATA_TYPE]
        bias_type = cd if bias_type == -1 else bias_type
        if (epi in BIAS_EPILOGUES | BGRAD_EPILOGUES) and bias_type != SUPPORTED_TYPES[(ab, cd)]:
            raise StandInError(NOT_SUPPORTED, f"bias type {bias_type} with A/B {ab}, C/D {cd}")
        aux_ld = desc[DescAttr.EPILOGUE_AUX_LD]
        if epi in AUX_EPILOGUES:
            if aux_ld < m or aux_ld % 8:  # GELU aux ld: at least D's rows and a multiple of 8
                raise StandInError(INVALID_VALUE, f"GELU aux ld {aux_ld} with m = {m}")
            if desc[DescAttr.EPILOGUE_AUX_DATA_TYPE] not in (-1, cd):
                raise StandInError(INVALID_VALUE, "a GELU aux type other than D's")
        if epi == int(Epi.BGRADA) and transa != OP_N:
            raise StandInError(NOT_SUPPORTED, "BGRADA with op(A) = T")
        if epi == int(Epi.BGRADB) and transb != OP_T:
            raise StandInError(NOT_SUPPORTED, "BGRADB with op(B) = N")
        return Problem(m, n, k, batch, transa, transb, ab, cd, epi, bias_type, aux_ld)

    def _layouts(self, *layouts: int) -> tuple[dict, ...]:
        return tuple(self._get(lay, "layout") for lay in layouts)

    # --- heuristic ---
    @_bound
    def matmul_algo_get_heuristic(self, light_handle: int, operation_desc: int, adesc: int, bdesc: int,
                                  cdesc: int, ddesc: int, preference: int, requested_algo_count: int,
                                  heuristic_results_array: int, return_algo_count: int) -> None:
        self._get(light_handle, "handle")
        desc = self._get(operation_desc, "desc")
        pref = self._get(preference, "pref")
        if requested_algo_count <= 0:
            raise StandInError(INVALID_VALUE, "requestedAlgoCount <= 0")
        problem = self._problem(desc, self._layouts(adesc, bdesc, cdesc, ddesc))
        alignments = {  # what the algorithm may assume of each pointer (the bias/aux ones: their value now)
            "A": pref[PrefAttr.MIN_ALIGNMENT_A_BYTES], "B": pref[PrefAttr.MIN_ALIGNMENT_B_BYTES],
            "C": pref[PrefAttr.MIN_ALIGNMENT_C_BYTES], "D": pref[PrefAttr.MIN_ALIGNMENT_D_BYTES],
            "bias": _alignment(desc[DescAttr.BIAS_POINTER]), "aux": _alignment(desc[DescAttr.EPILOGUE_AUX_POINTER]),
        }
        found = min(requested_algo_count, self.n_algos)
        results = _raw(heuristic_results_array, np.dtype(real.matmul_heuristic_result_dtype), requested_algo_count)
        ws = min(self.algo_workspace, pref[PrefAttr.MAX_WORKSPACE_BYTES])  # what each algorithm asks for
        for i in range(found):
            algo_id = next(self._ids)
            self._algos[algo_id] = Algo(problem.signature(), alignments, ws, dict(pref))
            results[i:i + 1] = np.zeros(1, results.dtype)
            results["algo"]["data_"][i, 0] = algo_id
            results["workspace_size"][i] = ws
            results["state"][i] = SUCCESS
            results["waves_count"][i] = 1.0
        _raw(return_algo_count, np.dtype(np.int32), 1)[0] = found

    # --- the product ---
    @_bound
    def matmul(self, light_handle: int, compute_desc: int, alpha: int, a: int, adesc: int, b: int, bdesc: int,
               beta: int, c: int, cdesc: int, d: int, ddesc: int, algo: int, workspace: int,
               workspace_size_in_bytes: int, stream: int) -> None:
        self._get(light_handle, "handle")
        desc = self._get(compute_desc, "desc")
        layouts = self._layouts(adesc, bdesc, cdesc, ddesc)
        p = self._problem(desc, layouts)
        if algo == 0:
            raise NotImplementedError("stand-in: algo = NULL (cuBLASLt's implicit heuristic) is not modeled")
        chosen = self._algos.get(int(_raw(algo, np.dtype(real.matmul_algo_dtype), 1)[0]["data_"][0]))
        if chosen is None or chosen.problem != p.signature():
            raise StandInError(INVALID_VALUE, "the algorithm was not chosen for this problem")
        if workspace_size_in_bytes < chosen.workspace_size or (workspace_size_in_bytes and workspace % 256):
            raise StandInError(INVALID_VALUE, "the workspace is smaller than the algorithm's or not 256-byte aligned")
        alpha_v = float(_raw(alpha, NP_TYPE[F32], 1)[0])  # host pointer mode, fp32 scale
        beta_v = float(_raw(beta, NP_TYPE[F32], 1)[0])
        bias_ptr, aux_ptr = desc[DescAttr.BIAS_POINTER], desc[DescAttr.EPILOGUE_AUX_POINTER]
        if p.epilogue in BIAS_EPILOGUES | BGRAD_EPILOGUES and not bias_ptr:
            raise StandInError(INVALID_VALUE, "the epilogue's bias pointer is not set")
        if p.epilogue in AUX_EPILOGUES and not aux_ptr:
            raise StandInError(NOT_SUPPORTED, "the GELU aux pointer is not set")
        pointers = {"A": a, "B": b, "C": c, "D": d, "bias": bias_ptr, "aux": aux_ptr}
        for name, ptr in pointers.items():
            if ptr and ptr % min(chosen.alignments[name], MAX_ALGO_ALIGN):
                raise StandInError(INVALID_VALUE, f"{name} at {ptr:#x} is less aligned than the algorithm assumes "
                                                  f"({chosen.alignments[name]} bytes)")

        self.last_matmul = {
            "handle": light_handle, "desc": dict(desc), "layouts": dict(zip("ABCD", map(dict, layouts))),
            "problem": p, "preference": chosen.preference, "algo_alignments": dict(chosen.alignments),
            "workspace": workspace, "workspace_size": workspace_size_in_bytes, "stream": stream,
            "alpha": alpha_v, "beta": beta_v, "pointers": pointers,
        }
        frozen = tuple(dict(lay) for lay in layouts)  # what the call was given (a capture keeps it)
        touched = [ptr for name, ptr in pointers.items() if name != "C" or beta_v != 0]
        self.device.launch(stream, "cublasLtMatmul",
                           lambda: self._product(p, frozen, alpha_v, beta_v, a, b, c, d, bias_ptr, aux_ptr),
                           touched + ([workspace] if workspace_size_in_bytes else []))

    @staticmethod
    def _product(p: Problem, layouts, alpha_v, beta_v, a, b, c, d, bias_ptr, aux_ptr) -> None:
        """The device work of one matmul: D (and the epilogue's vector or aux) from memory at the pointers."""
        A, B, C, D = layouts

        def view(ptr, lay):
            return _matrices(ptr, lay[LayoutAttr.TYPE], lay[LayoutAttr.ROWS], lay[LayoutAttr.COLS],
                             lay[LayoutAttr.LD], p.batch, lay[LayoutAttr.STRIDED_BATCH_OFFSET])

        opA = view(a, A).astype(np.float32)
        opB = view(b, B).astype(np.float32)
        if p.transa == OP_T:
            opA = opA.transpose(0, 2, 1)
        if p.transb == OP_T:
            opB = opB.transpose(0, 2, 1)
        acc = np.float32(alpha_v) * np.matmul(opA, opB)  # [batch, m, n], fp32 accumulation
        if beta_v != 0:
            acc = acc + np.float32(beta_v) * view(c, C).astype(np.float32)
        bias_np = NP_TYPE[p.bias_type]
        if p.epilogue in BIAS_EPILOGUES:  # a vector along D's rows, added to every column
            acc = acc + _raw(bias_ptr, bias_np, p.m).astype(np.float32)[None, :, None]
        if p.epilogue in AUX_EPILOGUES:  # GELU's input, D-shaped with its own ld, in D's type
            aux = _matrices(aux_ptr, p.cd_type, p.m, p.n, p.aux_ld, 1, 0)
            aux[...] = acc.astype(NP_TYPE[p.cd_type])
        if p.epilogue in GELU_EPILOGUES:
            acc = gelu_tanh(acc)
        if p.epilogue == int(Epi.BGRADA):  # sum over k of op(A): one per row of D (not scaled by alpha)
            _raw(bias_ptr, bias_np, p.m)[...] = opA[0].sum(axis=1).astype(bias_np)
        if p.epilogue == int(Epi.BGRADB):  # sum over k of op(B): one per column of D
            _raw(bias_ptr, bias_np, p.n)[...] = opB[0].sum(axis=0).astype(bias_np)
        view(d, D)[...] = acc.astype(NP_TYPE[p.cd_type])  # one rounding, to D's type
