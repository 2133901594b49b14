"""cuBLASLt matrix products for `--precision bf16`, through nvmath-python's low-level bindings.

Row-major to column-major. crystal's arrays are row-major (C-contiguous); cuBLASLt reads every
matrix column-major. A row-major [R, C] array read column-major with ld = C is its transpose
[C, R], so these two products are the same memory:

    out[M, N]   = op(a)[M, K]   @ op(b)[K, N]      row-major, what crystal asks for
    out^T[N, M] = op(b)^T[N, K] @ op(a)^T[K, M]    column-major, what cuBLASLt computes

cuBLASLt's A is crystal's b, its B is crystal's a, D (= C, beta = 0) is out with ld = N, and
(m, n, k) = (N, M, K). Every operand's layout is its storage read column-major (rows = its
last dimension, cols = the one before, ld = rows); the transposes stay with their operand
(b not transposed is stored [K, N], read as [N, K] = the op(A) cuBLASLt wants: transa = N).

The epilogues, in cuBLASLt's terms:
- bias[N]: BIAS adds a vector along D's rows (length m = N) to each of its columns (crystal's rows).
- gelu_pre: GELU_AUX_BIAS writes aux = A B + bias (D's shape, ld = N) and D = gelu_tanh(aux).
- dbias[N] = sum_k op(b)[k, n]: the sum over k of op(A) = op(b)^T, i.e. BGRADA (length m = N).
  cuBLASLt runs BGRADA only with op(A) = N and BGRADB only with op(B) = T, so dbias needs
  trans_b=False. dW = inp^T @ dout then is D = dout (N) . inp^T (T) with BGRADA: llm.c's
  weight-gradient product (D = inp (N) . dout^T (T) with BGRADB, llm.c's weights being
  [OC, C]) with A and B swapped, because crystal's GPT-2 weights are [C, OC].
- dbias_a[M] = sum_k op(a)[m, k]: the sum over k of op(B) = op(a)^T, i.e. BGRADB (length n = M),
  which needs trans_a=True. The nn.Linear layout's weight gradient (Llama, weights [OC, C]),
  dW = dout^T @ inp, is D = inp (N) . dout^T (T) with BGRADB: llm.c's product exactly.
  Types: A/B bf16, C/D fp32 (dW goes straight into an fp32 gradient slot), COMPUTE_32F with an
  fp32 scale (a row of cublasLtMatmul's type table), and dbias fp32: cublasLt.h (cuBLAS 13.10,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER) says "Bias gradient vector elements are the same type as
  the output elements (Ctype)", and of BIAS_DATA_TYPE "Bias vector elements are the same type as
  the elements of output matrix (Dtype)" (IMMA and fp8 kernels excepted). llm.c writes a bf16 dW
  (C/D and dbias bf16); crystal's bf16-in/fp32-out product keeps that same rule, with fp32.

Strided rows and accumulation (LoRA's B on a column block of a fused product): a 2-D operand may
be a column block x[:, lo:lo + n] of a wider row-major [R, W] array (its rows W apart: unit
column stride), read with ld = W; `accumulate` sets beta = 1 with C = D = out, so the product is
added to out in the same pass (out = op(a) op(b) + out, fp32 accumulation, one rounding to out's
type). Nothing is copied.

Determinism: one handle per sphere thread; per (shapes, types, transposes, epilogue, pointer
alignments) one descriptor set and one algorithm, the heuristic's first with split-K
reductions masked out, chosen on first use and reused by every later call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from nvmath import CudaDataType
from nvmath.bindings.cublas import ComputeType, Operation

BF16 = int(CudaDataType.CUDA_R_16BF)
F32 = int(CudaDataType.CUDA_R_32F)
GELU_AUX_LD_MULTIPLE = 8  # cuBLASLt: the GELU aux leading dimension must be a multiple of 8
WORKSPACE_ALIGN = 256  # cublasLtMatmul: the workspace must be 256-byte aligned
MAX_ASSUMED_ALIGN = 16  # the alignment the heuristic may assume of a pointer: 16 B (128-bit accesses) at most


class LtError(RuntimeError):
    """A cuBLASLt product that cannot run (no algorithm, or the library refused it); one line."""


def device_pointer(x) -> int:
    """The address of x's first element: x.data.ptr of a cupy array, x.ctypes.data of a numpy one."""
    if isinstance(x, np.ndarray):  # (numpy's x.data is a memoryview, refused for bfloat16)
        return int(x.ctypes.data)
    return int(x.data.ptr)


def _data_type(x, what: str) -> int:
    """x's cudaDataType: bf16 (2-byte storage: ml_dtypes.bfloat16 on numpy, uint16 on cupy) or fp32."""
    dt = np.dtype(x.dtype)
    if dt.itemsize == 2 and dt.name in ("bfloat16", "uint16"):
        return BF16
    if dt == np.float32:
        return F32
    raise ValueError(f"cuBLASLt gemm: {what} has dtype {dt}, neither bf16 (bfloat16/uint16 storage) nor float32")


def _alignment(ptr: int) -> int:
    """The largest power of two dividing ptr, up to MAX_ASSUMED_ALIGN: what the heuristic may assume."""
    return MAX_ASSUMED_ALIGN if ptr == 0 else min(MAX_ASSUMED_ALIGN, ptr & -ptr)


def _type_name(t: int) -> str:
    return "bf16" if t == BF16 else "fp32"


@dataclass
class _Plan:
    """The descriptors and the algorithm of one kind of product, made once and reused."""

    desc: int = 0
    layouts: tuple[int, ...] = ()  # cuBLASLt's A (crystal's b), B (crystal's a), D (= C: out)
    pref: int = 0
    heuristic: np.ndarray | None = None  # one cublasLtMatmulHeuristicResult_t; .algo is what runs
    algo_ptr: int = 0


class LtMatmul:
    """cuBLASLt products for one sphere thread: its own handle, a workspace allocated once,
    descriptors/algorithms cached per (shapes, dtypes, transposes, epilogue)."""

    def __init__(self, lt, workspace, stream: Callable[[], int] = lambda: 0, tf32: bool = False):
        """lt: nvmath.bindings.cublasLt or a stand-in with its names and signatures.
        tf32: float32 products on tensor cores (COMPUTE_32F_FAST_TF32; --precision tf32 with graphs).
        workspace: 1-D uint8 array (cupy on a GPU, numpy under emulation) allocated once by the
        caller; cuBLASLt gets it from its first 256-byte aligned byte on (cupy's allocations are
        aligned already; a large numpy one is 16-byte aligned). stream: returns the CUDA stream
        handle to run on, read at each call."""
        if workspace.ndim != 1 or np.dtype(workspace.dtype).itemsize != 1:
            raise ValueError(f"cuBLASLt workspace: a 1-D uint8 array, got {workspace.dtype} {workspace.shape}")
        skip = -device_pointer(workspace) % WORKSPACE_ALIGN  # cublasLtMatmul: a 256-byte aligned workspace
        if workspace.nbytes <= skip:
            raise ValueError(f"cuBLASLt workspace: {workspace.nbytes} bytes hold no {WORKSPACE_ALIGN}-byte aligned one")
        self.lt = lt
        self.workspace = workspace  # kept alive: cuBLASLt may use it until the stream has run
        self._ws_ptr, self._ws_bytes = device_pointer(workspace) + skip, int(workspace.nbytes) - skip
        self._stream = stream
        self._alpha = np.ones(1, np.float32)  # host scalars (pointer mode host, scale type fp32)
        self._beta = np.zeros(1, np.float32)  # beta = 0: C (= D's buffer) is never read
        self._beta_one = np.ones(1, np.float32)  # beta = 1 (accumulate): D = op(A) op(B) + C, C = D
        self._plans: dict[tuple, _Plan] = {}
        self._tf32 = tf32
        self.handle = int(lt.create())

    # --- the product ---
    def gemm(self, out, a, b, *, trans_a=False, trans_b=False, bias=None, gelu_pre=None, dbias=None,
             dbias_a=None, accumulate=False) -> None:
        """out[..., M, N] = op(a)[..., M, K] @ op(b)[..., K, N], row-major arrays (C-contiguous; a
        2-D one may have strided rows: a column block of a wider array), op = transpose of the last
        two axes when trans_* is set; 3-D arrays: a strided batch. accumulate: out += the product
        (beta = 1; no epilogue). Epilogues (2-D only, one at a time): bias[N]: out += bias;
        gelu_pre (requires bias): gelu_pre = op(a)@op(b) + bias, out = gelu_tanh(gelu_pre);
        dbias[N] = sum_k op(b)[k, n]; dbias_a[M] = sum_k op(a)[m, k]."""
        if self.handle is None:
            raise LtError("cuBLASLt gemm after close()")
        M, N, K, batch = _check_shapes(out, a, b, trans_a, trans_b)
        lds = (_leading_dim(b), _leading_dim(a), _leading_dim(out))  # cuBLASLt's A, B, D (= C)
        ab_type, out_type = _data_type(a, "a"), _data_type(out, "out")
        if _data_type(b, "b") != ab_type:
            raise ValueError("cuBLASLt gemm: a and b must have the same dtype")
        if ab_type == F32 and out_type != F32:
            raise ValueError("cuBLASLt gemm: fp32 inputs need an fp32 out")
        epilogue, vec = self._epilogue(out, out_type, M, N, trans_a, trans_b, bias, gelu_pre, dbias, dbias_a)
        if accumulate and epilogue != self.lt.Epilogue.DEFAULT:
            raise ValueError("cuBLASLt gemm: accumulate goes alone (no bias, gelu_pre, dbias or dbias_a)")

        a_ptr, b_ptr, out_ptr = device_pointer(a), device_pointer(b), device_pointer(out)
        vec_ptr = device_pointer(vec) if vec is not None else 0
        aux_ptr = device_pointer(gelu_pre) if gelu_pre is not None else 0
        key = (batch, M, N, K, trans_a, trans_b, ab_type, out_type, epilogue, lds,
               _alignment(b_ptr), _alignment(a_ptr), _alignment(out_ptr), _alignment(vec_ptr), _alignment(aux_ptr))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(key, a.shape, b.shape, vec_ptr, aux_ptr)
        else:  # this call's vectors (the heuristic saw pointers of the same alignment)
            self._desc_pointers(plan.desc, vec_ptr, aux_ptr)

        A, B, D = plan.layouts
        try:  # cuBLASLt: D = alpha op(A) op(B) + beta C with A = b, B = a, C = D = out
            beta = self._beta_one if accumulate else self._beta
            self.lt.matmul(self.handle, plan.desc, self._alpha.ctypes.data, b_ptr, A, a_ptr, B,
                           beta.ctypes.data, out_ptr, D, out_ptr, D, plan.algo_ptr,
                           self._ws_ptr, self._ws_bytes, int(self._stream()))
        except self.lt.cuBLASLtError as e:
            raise LtError(f"cuBLASLt matmul failed for {_describe(key)}: {e}") from e

    def _epilogue(self, out, out_type, M, N, trans_a, trans_b, bias, gelu_pre, dbias, dbias_a):
        """(cuBLASLt epilogue, the vector it reads or writes) for these arguments, checked."""
        E = self.lt.Epilogue
        if bias is None and gelu_pre is None and dbias is None and dbias_a is None:
            return E.DEFAULT, None
        if out.ndim != 2:
            raise ValueError("cuBLASLt gemm: epilogues (bias, gelu_pre, dbias, dbias_a) are for 2-D products only")
        if dbias_a is not None:
            if bias is not None or gelu_pre is not None or dbias is not None:
                raise ValueError("cuBLASLt gemm: dbias_a goes alone (no bias, gelu_pre or dbias)")
            if not trans_a:  # BGRADB: cuBLASLt runs it with op(B) = T only, and B is crystal's a
                raise ValueError("cuBLASLt gemm: dbias_a needs trans_a=True (BGRADB runs with op(B) = T only)")
            _check_vector(dbias_a, "dbias_a", M, out_type)
            return E.BGRADB, dbias_a
        if dbias is not None:
            if bias is not None or gelu_pre is not None:
                raise ValueError("cuBLASLt gemm: dbias goes alone (no bias, no gelu_pre)")
            if trans_b:  # BGRADA: cuBLASLt runs it with op(A) = N only, and A is crystal's b
                raise ValueError("cuBLASLt gemm: dbias needs trans_b=False (BGRADA runs with op(A) = N only)")
            _check_vector(dbias, "dbias", N, out_type)
            return E.BGRADA, dbias
        if bias is None:
            raise ValueError("cuBLASLt gemm: gelu_pre needs bias (GELU_AUX_BIAS)")
        _check_vector(bias, "bias", N, out_type)
        if gelu_pre is None:
            return E.BIAS, bias
        if tuple(gelu_pre.shape) != tuple(out.shape) or _data_type(gelu_pre, "gelu_pre") != out_type:
            raise ValueError("cuBLASLt gemm: gelu_pre must have out's shape and dtype")
        if not gelu_pre.flags.c_contiguous:
            raise ValueError("cuBLASLt gemm: gelu_pre must be C-contiguous")
        if N % GELU_AUX_LD_MULTIPLE:  # its leading dimension (N) must be a multiple of 8
            raise ValueError(f"cuBLASLt gemm: gelu_pre needs N % {GELU_AUX_LD_MULTIPLE} == 0 (GELU aux ld), N = {N}")
        return E.GELU_AUX_BIAS, bias

    # --- descriptors, layouts, preference and algorithm of one kind of product ---
    def _plan(self, key: tuple, a_shape, b_shape, vec_ptr: int, aux_ptr: int) -> _Plan:
        (batch, M, N, K, trans_a, trans_b, ab_type, out_type, epilogue, lds,
         align_A, align_B, align_D, _align_vec, _align_aux) = key
        lt = self.lt
        Desc, Pref = lt.MatmulDescAttribute, lt.MatmulPreferenceAttribute
        plan = _Plan()
        try:
            compute = ComputeType.COMPUTE_32F_FAST_TF32 if self._tf32 and ab_type == F32 else ComputeType.COMPUTE_32F
            plan.desc = int(lt.matmul_desc_create(int(compute), F32))
            op = {False: int(Operation.N), True: int(Operation.T)}
            self._desc_set(plan.desc, Desc.TRANSA, op[trans_b])  # cuBLASLt's A is crystal's b
            self._desc_set(plan.desc, Desc.TRANSB, op[trans_a])
            self._desc_set(plan.desc, Desc.EPILOGUE, int(epilogue))
            if epilogue != lt.Epilogue.DEFAULT:  # the vector's type: out's (cuBLASLt's table)
                self._desc_set(plan.desc, Desc.BIAS_DATA_TYPE, out_type)
            if epilogue == lt.Epilogue.GELU_AUX_BIAS:  # aux: D-shaped, ld = D's rows = N
                self._desc_set(plan.desc, Desc.EPILOGUE_AUX_LD, N)
            self._desc_pointers(plan.desc, vec_ptr, aux_ptr)  # the heuristic reads their alignment

            # each operand's storage read column-major: rows = last dim, cols = the one before,
            # ld = its row stride (rows, or the wider array's width for a column block)
            for data_type, shape, ld in zip((ab_type, ab_type, out_type), (b_shape, a_shape, (M, N)), lds):
                rows, cols = shape[-1], shape[-2]
                layout = int(lt.matrix_layout_create(data_type, rows, cols, ld))
                plan.layouts += (layout,)
                if batch > 1:  # a strided batch: rows * cols elements from one matrix to the next
                    self._layout_set(layout, lt.MatrixLayoutAttribute.BATCH_COUNT, batch)
                    self._layout_set(layout, lt.MatrixLayoutAttribute.STRIDED_BATCH_OFFSET, rows * cols)

            plan.pref = int(lt.matmul_preference_create())
            self._pref_set(plan.pref, Pref.MAX_WORKSPACE_BYTES, self._ws_bytes)
            self._pref_set(plan.pref, Pref.REDUCTION_SCHEME_MASK, int(lt.ReductionScheme.NONE))  # no split-K
            for attr, align in ((Pref.MIN_ALIGNMENT_A_BYTES, align_A), (Pref.MIN_ALIGNMENT_B_BYTES, align_B),
                                (Pref.MIN_ALIGNMENT_C_BYTES, align_D), (Pref.MIN_ALIGNMENT_D_BYTES, align_D)):
                self._pref_set(plan.pref, attr, align)

            plan.heuristic = np.zeros(1, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, dtype=np.int32)
            A, B, D = plan.layouts
            try:
                lt.matmul_algo_get_heuristic(self.handle, plan.desc, A, B, D, D, plan.pref, 1,
                                             plan.heuristic.ctypes.data, count.ctypes.data)
            except lt.cuBLASLtError as e:
                raise LtError(f"cuBLASLt refused {_describe(key)}: {e}") from e
            if count[0] < 1 or int(plan.heuristic["state"][0]) != 0:
                raise LtError(f"cuBLASLt has no algorithm for {_describe(key)}")
            plan.algo_ptr = plan.heuristic.ctypes.data + plan.heuristic.dtype.fields["algo"][1]
            return plan
        except BaseException:
            self._free(plan)
            raise

    def _desc_pointers(self, desc: int, vec_ptr: int, aux_ptr: int) -> None:
        A = self.lt.MatmulDescAttribute
        if vec_ptr:
            self._desc_set(desc, A.BIAS_POINTER, vec_ptr)
        if aux_ptr:
            self._desc_set(desc, A.EPILOGUE_AUX_POINTER, aux_ptr)

    # one attribute, from a buffer of its own C type (int32_t, uint64_t, void* ...)
    def _desc_set(self, desc: int, attr, value) -> None:
        buf = np.array(value, dtype=self.lt.get_matmul_desc_attribute_dtype(attr))
        self.lt.matmul_desc_set_attribute(desc, attr, buf.ctypes.data, buf.nbytes)

    def _layout_set(self, layout: int, attr, value) -> None:
        buf = np.array(value, dtype=self.lt.get_matrix_layout_attribute_dtype(attr))
        self.lt.matrix_layout_set_attribute(layout, attr, buf.ctypes.data, buf.nbytes)

    def _pref_set(self, pref: int, attr, value) -> None:
        buf = np.array(value, dtype=self.lt.get_matmul_preference_attribute_dtype(attr))
        self.lt.matmul_preference_set_attribute(pref, attr, buf.ctypes.data, buf.nbytes)

    # --- teardown ---
    def _free(self, plan: _Plan) -> None:
        if plan.pref:
            self.lt.matmul_preference_destroy(plan.pref)
        for layout in plan.layouts:
            self.lt.matrix_layout_destroy(layout)
        if plan.desc:
            self.lt.matmul_desc_destroy(plan.desc)
        plan.desc, plan.layouts, plan.pref = 0, (), 0

    def close(self) -> None:
        """Destroy every descriptor and the handle (after the stream's work is done); idempotent."""
        if self.handle is None:
            return
        for plan in self._plans.values():
            self._free(plan)
        self._plans.clear()
        self.lt.destroy(self.handle)
        self.handle = None


def _leading_dim(x) -> int:
    """The distance, in elements, from one row of row-major x to the next: its width when it is
    C-contiguous, the wider array's for a column block (checked by _check_shapes)."""
    if x.flags.c_contiguous or x.ndim != 2 or x.shape[0] == 1:
        return int(x.shape[-1])
    return int(x.strides[0] // x.itemsize)


def _row_strided(x) -> bool:
    """x is a 2-D column block of a row-major array: unit column stride, rows at least its width
    apart, a whole number of elements."""
    return (x.ndim == 2 and x.strides[1] == x.itemsize and x.strides[0] % x.itemsize == 0
            and x.strides[0] >= x.shape[1] * x.itemsize)


def _check_shapes(out, a, b, trans_a: bool, trans_b: bool) -> tuple[int, int, int, int]:
    """(M, N, K, batch) of out = op(a) @ op(b), or a ValueError naming what does not fit."""
    for name, x in (("out", out), ("a", a), ("b", b)):
        if not (x.flags.c_contiguous or _row_strided(x)):
            raise ValueError(f"cuBLASLt gemm: {name} must be row-major: C-contiguous, or a 2-D column block "
                             f"of a row-major array")
    if not (out.ndim == a.ndim == b.ndim and out.ndim in (2, 3)):
        raise ValueError(f"cuBLASLt gemm: out, a, b must be all 2-D or all 3-D, got {out.ndim}, {a.ndim}, {b.ndim}")
    M, K = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]
    Kb, N = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]
    batch = out.shape[0] if out.ndim == 3 else 1
    if Kb != K or tuple(out.shape[-2:]) != (M, N) or (out.ndim == 3 and not a.shape[0] == b.shape[0] == batch):
        raise ValueError(f"cuBLASLt gemm: op(a) {tuple(a.shape)}{'^T' if trans_a else ''} @ "
                         f"op(b) {tuple(b.shape)}{'^T' if trans_b else ''} does not make out {tuple(out.shape)}")
    if min(M, N, K, batch) < 1:
        raise ValueError(f"cuBLASLt gemm: empty product (M, N, K, batch) = {(M, N, K, batch)}")
    return int(M), int(N), int(K), int(batch)


def _check_vector(v, name: str, N: int, out_type: int) -> None:
    """A bias or bias gradient: [N], contiguous, out's type (cublasLt.h: bias and bias-gradient
    elements have the output's type, for bf16 and fp32 inputs alike)."""
    if tuple(v.shape) != (N,) or not v.flags.c_contiguous:
        raise ValueError(f"cuBLASLt gemm: {name} must be a contiguous [{N}] vector, got {tuple(v.shape)}")
    if _data_type(v, name) != out_type:
        raise ValueError(f"cuBLASLt gemm: {name} must have out's dtype ({_type_name(out_type)}), "
                         f"the bias type cuBLASLt supports for these inputs")


def _describe(key: tuple) -> str:
    """One line naming a product: shapes, types, transposes, epilogue, alignments."""
    batch, M, N, K, trans_a, trans_b, ab_type, out_type, epilogue, lds, *aligns = key
    lead = f"{batch} x " if batch > 1 else ""
    return (f"{lead}[{M}x{K}]{'(a^T)' if trans_a else ''} @ [{K}x{N}]{'(b^T)' if trans_b else ''} "
            f"{_type_name(ab_type)} -> {_type_name(out_type)}, epilogue {getattr(epilogue, 'name', epilogue)}, "
            f"leading dimensions (b, a, out) {lds}, alignments {tuple(aligns)}")
