"""CUDA backend: cupy RawKernels compiled from kernels/*.cu, cuBLAS through cupy.matmul.

Each sphere is a host thread issuing work on its own non-blocking CUDA stream (cupy's current
stream is per thread). Ordering between the root and the spheres is by events only: a sphere's
stream waits for the event the root recorded after the last optimizer step, and the root's
stream waits for every sphere's end-of-task event before the reducer reads the gradient slots.
Scratch buffers (attention layouts, reduction partials) are per thread and allocated once per
shape; cupy's memory pool is stream-aware, so nothing is handed from one stream to another.

Determinism: every kernel has a fixed reduction order (see kernels/README.md); each sphere
thread has its own cuBLAS handle and stream, so a product's result never depends on which
sphere computed it. TF32 is off unless `precision="tf32"`. LoRA's products on a column block of a
fused product (matmul_columns_*) go through cuBLASLt in every precision: the block is read and
written in place with the fused width as leading dimension, which cupy's matmul would copy.

bf16 (`precision="bf16"`, compute capability 8.0+): master parameters, gradients, AdamW moments,
the reducer and the loss stay float32; the spheres read a bf16 copy of the weights (one cast
kernel after each optimizer step) and keep activations and their gradients in bf16 (the
`_bf16` kernels: bf16 in memory, float32 arithmetic, one rounding per stored value). Products
go through cuBLASLt (crystal.backends.cublaslt, fp32 accumulation, bias and bias+GELU fused
into the forward's epilogue, the bias gradient into the weight-gradient product's) and write the
weight gradients in float32 straight into the reducer's slots. Attention is cuDNN's fused flash
attention when cuDNN is installed (crystal.backends.cudnn_attention: [B,NH,T] softmax
statistics saved, the backward recomputes), else the cuBLAS + softmax path in bf16. On cupy,
bf16 arrays are uint16 storage (cupy has no bfloat16 dtype).

CUDA graphs (`graphs=True`, crystal.graphs): a thread captures what it issues between
`begin_capture` and `end_capture` on its own stream and replays it with `launch_graph`. Nothing
in a capture may allocate or wait for the device, and every value that changes from step to step
is read from device memory that the host rewrites before each replay: the micro-batches' tokens,
the encoder backward's token buckets and the dropout keys (`stage`, one host-to-device copy per
thread), AdamW's scalars (`adamw_update` with a device array), the losses and the norm (written
to device buffers, read back once per step). cupy's own cuBLAS calls refuse a capturing stream,
so with graphs every product, fp32 included, goes through cuBLASLt (bound to the stream).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import numpy as np

from crystal.backends.base import AdamWScalars, vocab_columns
from crystal.errors import GraphCaptureError
from crystal.backends.kernels import (ADAMW_SCALARS, KERNELS, REDUCE_BLOCKS, cdiv, column_sum_grids, grid_1d,
                                      grid_rows, kernels_dir)

BLOCK = 256  # threads per block for every launch (any multiple of 32 works)
LT_WORKSPACE_BYTES = 32 << 20  # cuBLASLt workspace per sphere thread (llm.c's size)
STAGE_ALIGN = 256  # bytes: each staged array starts on this boundary
ROOT_STREAM = -1  # sphere_context index of the root's own stream (graph steps)
_ARG = {"i32": np.int32, "i64": np.int64, "f32": np.float32, "f64": np.float64}


@functools.lru_cache(maxsize=None)
def _module(file: str):
    """One kernels/*.cu file compiled into a cupy RawModule, once per process (each file is
    its own translation unit: device helpers such as block_sum repeat across files)."""
    import cupy as cp

    return cp.RawModule(code=(kernels_dir() / file).read_text(),
                        options=("--std=c++17", f"-I{kernels_dir()}"))  # for block_reduce.cuh


class CudaBackend:
    """cupy implementation of `crystal.backends.base.Backend`."""

    name = "cuda"

    def __init__(self, precision: str = "fp32", block: int = BLOCK, *, gpu: int = 0, array_module=None,
                 launcher=None, lt=None, cudnn=None, flash: bool = True, graphs: bool = False):
        """gpu: the device index (every thread of this backend uses it). array_module and
        launcher replace cupy and the RawKernels: the tests run this backend's host code with
        numpy arrays and the CPU-emulated kernels. lt and cudnn (bf16 only) replace nvmath's
        cuBLASLt bindings and the cuDNN frontend (the tests pass numpy stand-ins; cudnn=None
        there means no cuDNN). flash=False: attention through cuBLAS + softmax even where cuDNN
        is installed. graphs: the run captures CUDA graphs, so every product goes through
        cuBLASLt from the first step (eager warm-up and fallback included: the same bits)."""
        self._device = None
        self.bf16 = precision == "bf16"
        self.graphs = graphs
        self.use_lt = self.bf16 or graphs  # cuBLASLt products (stream-bound: capturable)
        self._stream_ptr = lambda: 0
        if array_module is None:
            import cupy

            # ranks beyond the node's GPUs share them round-robin (and exchange through the host)
            self._device = cupy.cuda.Device(gpu % cupy.cuda.runtime.getDeviceCount())
            self._device.use()  # the root thread's device; spheres enter it in sphere_context
            array_module = cupy
            if self.use_lt:
                lt, cudnn = _lt_libraries(self._device, self.bf16)
            set_matmul_precision(precision)
            fns = {name: _module(k.file).get_function(name) for name, k in KERNELS.items()}

            def launcher(name, grid, block, *args):
                fns[name](grid, (block, 1, 1), args)

            self._stream_ptr = lambda: cupy.cuda.get_current_stream().ptr
            self.act_dtype = np.dtype(np.uint16) if self.bf16 else np.dtype(np.float32)
        else:
            self.act_dtype = np.dtype(_ml_bfloat16() if self.bf16 else np.float32)
        self.cp = array_module
        self.precision = precision
        self.block = block
        self._launcher = launcher
        self._lt_bindings = lt
        self._lt_compute = "tf32" if precision == "tf32" else "fp32"
        self._cudnn = cudnn if self.bf16 and flash else None
        self.flash = self._cudnn is not None  # cuDNN fused attention (bf16 only)
        self._streams: dict[int, object] = {}
        self._local = threading.local()
        self._counters: list[list[int]] = []  # every thread's launch counter
        self._counters_lock = threading.Lock()
        self.warm = False  # every kernel compiled (crystal.model.warm_up)

    # --- memory, streams, events ---
    def empty(self, shape, dtype="float32"):
        return self.cp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float32"):
        return self.cp.zeros(shape, dtype=dtype)

    def zero(self, x):
        self._count()
        self._issue(x.fill, 0)

    def to_device(self, host_array):
        self._no_capture("to_device")
        return self.cp.asarray(host_array)

    def upload(self, dev, host) -> None:
        """dev[...] = host (a host-to-device copy on the calling thread's stream)."""
        self._no_capture("a host-to-device copy")
        self._count()
        if isinstance(dev, np.ndarray):
            np.copyto(dev, host.reshape(dev.shape).view(dev.dtype))
        else:
            dev.set(host.reshape(dev.shape).view(dev.dtype))

    def stage(self, batches, vocab_size: int, keys=None):
        """The micro-batches [(x, y) host int32 [B,T]] into the calling thread's fixed input
        buffers, with what their ops read besides: the encoder backward's token buckets and the
        dropout keys (keys[k]: micro-batch k's site keys, crystal.dropout.Dropout.keys). One
        host-to-device copy for all; returns [(idx, targets)] device views, valid until this
        thread's next stage. A captured graph that read these views replays on new values."""
        n = len(batches)
        B, T = batches[0][0].shape
        BT, nk = B * T, len(keys[0]) if keys else 0
        parts = [("keys", np.int64, nk), ("idx", np.int32, BT), ("tgt", np.int32, BT),
                 ("positions", np.int32, BT), ("starts", np.int32, vocab_size + 1)]
        offsets, stride = {}, 0
        for name, dt, count in parts:
            offsets[name] = stride
            stride += cdiv(count * np.dtype(dt).itemsize, STAGE_ALIGN) * STAGE_ALIGN
        host = np.zeros((n, stride), np.uint8)
        dev = self._scratch("staging", (n, stride), "uint8")

        def view(buf, k, name, dt, count):
            return buf[k, offsets[name]:offsets[name] + count * np.dtype(dt).itemsize].view(dt)

        staged, slots, out = {}, {}, []
        for k, (x, y) in enumerate(batches):
            positions, starts = token_buckets(x, vocab_size)
            for name, values in (("idx", x), ("tgt", y), ("positions", positions), ("starts", starts)):
                view(host, k, name, np.int32, values.size)[...] = np.asarray(values).reshape(-1)
            if nk:
                view(host, k, "keys", np.int64, nk)[...] = keys[k]
        self.upload(dev, host)
        for k in range(n):
            idx, tgt = (view(dev, k, name, np.int32, BT).reshape(B, T) for name in ("idx", "tgt"))
            staged[id(idx)] = (idx, view(dev, k, "positions", np.int32, BT),
                               view(dev, k, "starts", np.int32, vocab_size + 1))
            if nk:
                kv = view(dev, k, "keys", np.int64, nk)
                slots.update({key: (kv, slot) for slot, key in enumerate(keys[k])})
            out.append((idx, tgt))
        self._local.staged, self._local.key_slots = staged, slots
        return out

    def to_host(self, array):
        self._no_capture("a read back to the host")
        host = self.cp.asnumpy(array)
        if self.bf16 and host.dtype == np.uint16:  # bf16 storage: the float32 it stands for
            return (host.astype(np.uint32) << 16).view(np.float32)
        return host

    def compute_weights(self, flat, out=None):
        """flat itself (fp32, tf32), or its bf16 copy, made once here (or refreshed into out);
        AdamW refreshes it (adamw_update's compute)."""
        if not self.bf16:
            return flat
        copy = self.empty(flat.shape, self.act_dtype) if out is None else out
        self._to_bf16(copy, flat)
        return copy

    @contextlib.contextmanager
    def sphere_context(self, index: int):
        """Run the calling thread's work on sphere `index`'s own non-blocking stream."""
        with self._device if self._device is not None else contextlib.nullcontext():
            if index not in self._streams:
                self._streams[index] = self.cp.cuda.Stream(non_blocking=True)
            with self._streams[index]:
                yield

    def record_event(self):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record()
        return ev

    def wait_event(self, event) -> None:
        if event is not None:
            self.cp.cuda.get_current_stream().wait_event(event)

    def synchronize(self) -> None:
        self._no_capture("a synchronization")
        self.cp.cuda.get_current_stream().synchronize()

    # --- CUDA graphs ---
    def capturing(self) -> bool:
        """Whether the calling thread is inside begin_capture ... end_capture."""
        return bool(self._local.__dict__.get("capturing"))

    def _no_capture(self, what: str) -> None:
        if self.capturing():
            raise GraphCaptureError(f"{what} inside a CUDA graph capture")

    def begin_capture(self) -> None:
        """Capture the calling thread's stream from here (thread-local mode: other threads go on)."""
        self._no_capture("a nested capture")
        cp = self.cp
        cp.cuda.get_current_stream().begin_capture(mode=cp.cuda.runtime.streamCaptureModeThreadLocal)
        self._local.capturing = True

    def end_capture(self):
        """The captured graph (a failed capture raises GraphCaptureError; the stream is restored)."""
        self._local.capturing = False
        try:
            return self.cp.cuda.get_current_stream().end_capture()
        except Exception as e:
            raise GraphCaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def launch_graph(self, graph) -> None:
        """Replay a captured graph on the calling thread's stream (one launch)."""
        self._count()
        graph.launch(self.cp.cuda.get_current_stream())

    def _issue(self, fn, *args, **kwargs) -> None:
        """Device work: fn(*args) now (a capturing stream records it). The emulated backend's
        capture records the call instead and its launch_graph replays the record."""
        rec = self._local.__dict__.get("recording")
        if rec is not None:
            rec.append((fn, args, kwargs))
        else:
            fn(*args, **kwargs)

    # --- launching ---
    def _count(self, n: int = 1) -> None:
        """Counts what this thread issues from Python: each kernel launch, library call (a cuBLAS
        or cuBLASLt product, a cuDNN graph), cupy array operation, host-to-device copy and graph
        launch is one. What a capture records is counted when its graph launches (as one)."""
        if self.capturing():
            return
        c = self._local.__dict__.get("launches")
        if c is None:
            c = self._local.launches = [0]
            with self._counters_lock:
                self._counters.append(c)
        c[0] += n

    def thread_launches(self) -> int:
        """Launches the calling thread has issued so far."""
        c = self._local.__dict__.get("launches")
        return c[0] if c else 0

    def launches(self) -> int:
        """Launches every thread has issued so far."""
        with self._counters_lock:
            return sum(c[0] for c in self._counters)

    def _launch(self, name: str, grid, *args) -> None:
        self._count()
        kinds = KERNELS[name].args
        assert len(kinds) == len(args), name
        self._issue(self._launcher, name, grid, self.block,
                    *(a if k == "ptr" else _ARG[k](a) for k, a in zip(kinds, args)))

    def _k(self, name: str) -> str:
        """The kernel for this precision: `name`, or its `name_bf16` twin (bf16 activations)."""
        return name + "_bf16" if self.bf16 else name

    def require_lt(self, what: str) -> None:
        """cuBLASLt's bindings, loaded now where this backend did not need them before (fp32 and
        tf32 without graphs run cupy's products; `what` needs cuBLASLt anyway): a one-line
        CrystalError naming `what` when nvmath-python is missing."""
        if self._lt_bindings is None:
            self._lt_bindings = _import_cublaslt(what)

    def _lt(self):
        """This thread's cuBLASLt products (its own handle and workspace, made on first use)."""
        lt = getattr(self._local, "lt", None)
        if lt is None:
            from crystal.backends.cublaslt import LtMatmul

            self.require_lt("a cuBLASLt product")
            workspace = self.cp.empty(LT_WORKSPACE_BYTES, dtype=np.uint8)
            lt = self._local.lt = LtMatmul(self._lt_bindings, workspace, self._stream_ptr,
                                           tf32=self._lt_compute == "tf32")
        return lt

    def _fa(self):
        """This thread's cuDNN flash attention (its own handle and graphs, made on first use)."""
        fa = getattr(self._local, "fa", None)
        if fa is None:
            from crystal.backends.cudnn_attention import FlashAttention

            fa = self._local.fa = FlashAttention(
                self._cudnn, lambda n: self.cp.empty(n, dtype=np.uint8), self._stream_ptr)
        return fa

    def _scratch(self, key: str, shape, dtype="float32"):
        """A per-thread buffer, allocated on first use for each (key, shape) and then reused."""
        store = self._local.__dict__.setdefault("buffers", {})
        k = (key, tuple(shape), dtype)
        if k not in store:
            self._no_capture(f"the first use of a {key} buffer of shape {tuple(shape)}")
            store[k] = self.cp.empty(shape, dtype=dtype)
        return store[k]

    def _column_sums(self, name: str, outs, inputs, N: int, C: int) -> None:
        """outs[k][c] = the k-th column sum over N rows, in two launches (kernels/column_reduce.cuh):
        `name`_partial writes the partial sums of P = column_parts(N) parts of the rows into this
        thread's scratch ([len(outs) P, C], allocated at the first call of each shape), then
        `name`_sum adds each column's P partials in a fixed order (a warp per column). The bits
        depend on the inputs and the shapes alone."""
        P, partial_grid, sum_grid = column_sum_grids(N, C, len(outs), self.block)
        partial = self._scratch("column_partials", (len(outs) * P, C))
        self._launch(self._k(name + "_partial"), partial_grid, partial, *inputs, N, C)
        self._launch(name + "_sum", sum_grid, *outs, partial, P, C)

    # --- encoder ---
    def encoder_forward(self, out, idx, wte, wpe):
        """wpe None (Llama): out = wte[idx] (the kernel gets a NULL wpe)."""
        B, T = idx.shape
        C = wte.shape[1]
        self._launch(self._k("encoder_forward"), grid_1d(B * T * C, self.block), out, idx, wte, wpe, B * T, T, C)

    def encoder_backward(self, dwte, dwpe, dout, idx):
        """dwpe None (Llama): only the token embedding's scatter."""
        B, T = idx.shape
        V, C = dwte.shape
        if dwpe is not None:
            self._launch(self._k("encoder_backward_wpe"), grid_1d(dwpe.shape[0] * C, self.block), dwpe, dout, B,
                         T, dwpe.shape[0], C)
        # bucket v (token v's positions, ascending) is positions[starts[v]:starts[v+1]], made on the
        # host by `stage` (token_buckets); for ids that were not staged, from a host copy of them
        staged = self._local.__dict__.get("staged", {}).get(id(idx))
        if staged is not None and staged[0] is idx:
            positions, starts = staged[1], staged[2]
        else:
            positions, starts = (self.to_device(a) for a in token_buckets(self.to_host(idx), V))
        vocab = self._vocab_ids(V)
        # one bucket per vocabulary id; the kernel strides over buckets by gridDim.y (<= 65535)
        self._launch(self._k("encoder_backward_wte"), (cdiv(C, self.block), min(V, 65535), 1), dwte, dout, vocab,
                     starts, positions, V, C)

    def _vocab_ids(self, V: int):
        store = self._local.__dict__.setdefault("vocab_ids", {})
        if V not in store:  # made on this thread's stream, so ordered before its first use
            self._no_capture("the vocabulary ids' first use")
            store[V] = self.cp.arange(V, dtype=np.int32)
        return store[V]

    # --- layernorm ---
    def layernorm_forward(self, out, mean, rstd, inp, w, b, eps):
        C = inp.shape[-1]
        N = inp.size // C
        self._launch(self._k("layernorm_forward"), grid_rows(N), out, mean, rstd, inp, w, b, N, C, eps)

    def residual_layernorm_forward(self, res, out, mean, rstd, a, b, w, bias, eps):
        """res = a + b and out = layernorm(res) in one kernel (one block per row)."""
        C = a.shape[-1]
        N = a.size // C
        self._launch(self._k("residual_layernorm_forward"), grid_rows(N), res, out, mean, rstd, a, b, w, bias,
                     N, C, eps)

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd):
        C = inp.shape[-1]
        N = inp.size // C
        self._launch(self._k("layernorm_backward_dinp"), grid_rows(N), dinp, dout, inp, w, mean, rstd, N, C)
        if dw is not None:  # None: a frozen LayerNorm (LoRA's base)
            self._column_sums("layernorm_backward_dwdb", (dw, db), (dout, inp, mean, rstd), N, C)

    # --- rmsnorm (Llama) ---
    def rmsnorm_forward(self, out, rstd, inp, w, eps):
        C = inp.shape[-1]
        N = inp.size // C
        self._launch(self._k("rmsnorm_forward"), grid_rows(N), out, rstd, inp, w, N, C, eps)

    def residual_rmsnorm_forward(self, res, out, rstd, a, b, w, eps):
        """res = a + b and out = rmsnorm(res) in one kernel (one block per row)."""
        C = a.shape[-1]
        N = a.size // C
        self._launch(self._k("residual_rmsnorm_forward"), grid_rows(N), res, out, rstd, a, b, w, N, C, eps)

    def rmsnorm_backward(self, dinp, dw, dout, inp, w, rstd):
        """dinp += ... (one block per row); dw written by the two-stage column sums (None: a frozen
        weight, no column sums)."""
        C = inp.shape[-1]
        N = inp.size // C
        self._launch(self._k("rmsnorm_backward_dinp"), grid_rows(N), dinp, dout, inp, w, rstd, N, C)
        if dw is not None:
            self._column_sums("rmsnorm_backward_dw", (dw,), (dout, inp, rstd), N, C)

    # --- matmul (cuBLAS; cuBLASLt with fused epilogues under bf16) + bias ---
    def matmul_forward(self, out, inp, w, bias):
        out2 = _rows(out)
        self._count()
        if self.use_lt:
            self._issue(self._lt().gemm, out2, _rows(inp), w, bias=bias)
            return
        self._cupy_matmul(_rows(inp), w, out2)
        if bias is not None:
            N, OC = out2.shape
            self._launch("bias_forward", grid_1d(N * OC, self.block), out2, bias, N, OC)

    def matmul_gelu_forward(self, out, pre, inp, w, bias):
        if self.use_lt and bias is not None and pre.shape[-1] % 8 == 0:  # cuBLASLt GELU_AUX_BIAS (aux ld: 8k)
            self._count()
            self._issue(self._lt().gemm, _rows(out), _rows(inp), w, bias=bias, gelu_pre=_rows(pre))
            return
        self.matmul_forward(pre, inp, w, bias)
        self.gelu_forward(out, pre)

    def matmul_backward(self, dinp, dw, dbias, dout, inp, w):
        """dw None (a frozen weight): dinp only, no weight product (dbias, if any, by column sums)."""
        dout2 = _rows(dout)
        self._count()
        if self.use_lt:  # dw (float32, a gradient slot) and dbias from one product's epilogue
            lt = self._lt()
            self._issue(lt.gemm, _rows(dinp), dout2, w, trans_b=True)
            if dw is not None:
                self._count()
                self._issue(lt.gemm, dw, _rows(inp), dout2, trans_a=True, dbias=dbias)
                return
        else:
            self._cupy_matmul(dout2, w.T, _rows(dinp))
            if dw is not None:
                self._count()
                self._cupy_matmul(_rows(inp).T, dout2, dw)
        if dbias is not None:
            N, OC = dout2.shape
            self._column_sums("bias_backward", (dbias,), (dout2,), N, OC)

    # --- a product into (or from) a column block [lo, lo+OC) of a wider [N, W] array: LoRA's B on a
    # part of a fused product (a llama's q, k, v of q|k|v, gate, up of gate|up). cuBLASLt in every
    # precision: the block is read and written in place with ld = W, and the forward's addition is
    # the product's own beta = 1 (cupy's matmul would copy a strided operand, and has no beta) ---
    def matmul_columns_forward(self, out, inp, w, lo):
        """out[:, lo:lo+OC] += inp[N,C] @ w[C,OC] (out [N,W]): one product, fp32 accumulation, one
        rounding to out's type (bf16 activations)."""
        block = _rows(out)[:, lo:lo + w.shape[1]]
        self._count()
        self._issue(self._lt().gemm, block, _rows(inp), w, accumulate=True)

    def matmul_columns_backward(self, dinp, dw, dout, inp, w, lo):
        """d = dout[:, lo:lo+OC] of dout [N,W], read in place: dinp = d @ w.T (activations' type),
        dw = inp.T @ d (float32: a gradient slot); both written."""
        d = _rows(dout)[:, lo:lo + w.shape[1]]
        lt = self._lt()
        self._count(2)
        self._issue(lt.gemm, _rows(dinp), d, w, trans_b=True)
        self._issue(lt.gemm, dw, _rows(inp), d, trans_a=True)

    # --- linear products in nn.Linear layout (w [OC, C]: Llama's weights, the LM head) ---
    def linear_forward(self, out, inp, w, bias):
        """out[N,OC] = inp[N,C] @ w[OC,C].T (+ bias: cuBLASLt's BIAS epilogue, or bias_forward after
        cuBLAS; None: the plain product, no epilogue)."""
        out2 = _rows(out)
        self._count()
        if self.use_lt:
            self._issue(self._lt().gemm, out2, _rows(inp), w, trans_b=True, bias=bias)
            return
        self._cupy_matmul(_rows(inp), w.T, out2)
        if bias is not None:
            N, OC = out2.shape
            self._launch("bias_forward", grid_1d(N * OC, self.block), out2, bias, N, OC)

    def linear_backward(self, dinp, dw, dbias, dout, inp, w):
        """dinp = dout @ w, dw = dout.T @ inp (cuBLASLt: dbias from the same product's BGRADB
        epilogue), dbias = sum_rows dout; all written. dw None (a frozen weight): dinp only, no
        weight product (dbias, if any, by column sums)."""
        dout2 = _rows(dout)
        self._count()
        if self.use_lt:
            lt = self._lt()
            self._issue(lt.gemm, _rows(dinp), dout2, w)
            if dw is not None:
                self._count()
                self._issue(lt.gemm, dw, dout2, _rows(inp), trans_a=True, dbias_a=dbias)
                return
        else:
            self._cupy_matmul(dout2, w, _rows(dinp))
            if dw is not None:
                self._count()
                self._cupy_matmul(dout2.T, _rows(inp), dw)
        if dbias is not None:
            N, OC = dout2.shape
            self._column_sums("bias_backward", (dbias,), (dout2,), N, OC)

    def lm_head_forward(self, logits, inp, wte):
        self.linear_forward(logits, inp, wte, None)

    def lm_head_backward(self, dinp, dwte, dlogits, inp, wte):
        self.linear_backward(dinp, dwte, None, dlogits, inp, wte)

    def _cupy_matmul(self, a, b, out) -> None:
        """out = a @ b through cupy's cuBLAS (fp32/tf32 without graphs: it cannot be captured)."""
        self._no_capture("cupy's matmul")
        self.cp.matmul(a, b, out=out)

    def _bmm(self, out, a, b, trans_a=False, trans_b=False):
        """out[B,NH,X,Y] = op(a) @ op(b) per (batch, head): cupy's batched cuBLAS product, or
        cuBLASLt's strided-batched one on [B*NH, ., .] views (bf16, graphs)."""
        self._count()
        if self.use_lt:
            def flat3(x):
                return x.reshape(-1, *x.shape[2:])

            self._issue(self._lt().gemm, flat3(out), flat3(a), flat3(b), trans_a=trans_a, trans_b=trans_b)
            return
        t = (0, 1, 3, 2)
        self._cupy_matmul(a.transpose(t) if trans_a else a, b.transpose(t) if trans_b else b, out)

    # --- attention: cuDNN flash attention, or layout kernels + batched products + softmax ---
    def _flash(self, head_size: int) -> bool:
        """cuDNN fused attention here: bf16 with cuDNN, head sizes it supports (multiples of 8
        up to 256); other shapes take the cuBLAS + softmax path."""
        return self.flash and head_size % 8 == 0 and head_size <= 256

    def attention_saved(self, B, n_head, T, head_size):
        if self._flash(head_size):  # the softmax statistics (logsumexp per row); the backward recomputes
            return (B, n_head, T), np.dtype(np.float32)
        return (B, n_head, T, T), self.act_dtype

    def _flash_capture_check(self, drop) -> None:
        if drop and self.capturing():  # cuDNN reads its dropout seed from host memory at capture
            raise GraphCaptureError("cuDNN flash attention with dropout cannot be captured "
                                    "(its seed is a host value); use --dropout 0 or CRYSTAL_CUDNN=0")

    def _qkv_heads(self, qkv, n_head, KV):
        """q [B,NH,T,hs] and k, v [B,KV,T,hs] (this thread's scratch) from qkv[B,T,(NH+2KV)hs]."""
        B, T, W = qkv.shape
        hs = W // (n_head + 2 * KV)
        q = self._scratch("q", (B, n_head, T, hs), self.act_dtype)
        k, v = (self._scratch(name, (B, KV, T, hs), self.act_dtype) for name in ("k", "v"))
        self._launch(self._k("attention_permute"), grid_1d(q.size, self.block), q, k, v, qkv, B, T, n_head, KV, hs)
        return q, k, v, B, T, hs

    def attention_forward(self, out, att, qkv, n_head, drop=None, *, n_kv_head=None):
        """n_kv_head < n_head (grouped-query attention): query heads h*g .. h*g+g-1 (g = NH/KV) read
        kv head h. The products run on [B, KV, g*T, .] views of q, att and y against k, v
        [B, KV, T, hs]: no copy of k or v per query head."""
        KV = n_head if n_kv_head is None else n_kv_head
        if self._flash(qkv.shape[-1] // (n_head + 2 * KV)):
            self._count()
            self._flash_capture_check(drop)
            with _cudnn_errors():
                self._issue(self._fa().forward, out, att, qkv, n_head, dropout=_cudnn_dropout(drop), n_kv_head=KV)
            return
        q, k, v, B, T, hs = self._qkv_heads(qkv, n_head, KV)
        y = self._scratch("y", q.shape, self.act_dtype)
        grouped = _grouped(KV)
        self._bmm(grouped(att), grouped(q), k, trans_b=True)  # scores, scaled inside the softmax
        self._launch(self._k("softmax_causal_forward"), grid_rows(B * n_head * T), att, att, B * n_head, T,
                     1.0 / math.sqrt(hs))
        self._bmm(grouped(y), grouped(self._dropped(att, drop)), v)
        self._launch(self._k("attention_unpermute"), grid_1d(y.size, self.block), out, y, B, T, n_head, hs)

    def attention_backward(self, dqkv, dout, qkv, att, n_head, drop=None, *, out=None, n_kv_head=None):
        """dk, dv of kv head h = the sum over its g query heads' in ascending order: per query head
        products into [B, NH, T, hs] scratch, added by attention_permute_backward."""
        KV = n_head if n_kv_head is None else n_kv_head
        if self._flash(qkv.shape[-1] // (n_head + 2 * KV)):
            self._count()
            self._flash_capture_check(drop)
            with _cudnn_errors():
                self._issue(self._fa().backward, dqkv, dout, qkv, out, att, n_head, dropout=_cudnn_dropout(drop),
                            n_kv_head=KV)
            return
        q, k, v, B, T, hs = self._qkv_heads(qkv, n_head, KV)
        dy, dq, dk, dv = (self._scratch(name, q.shape, self.act_dtype) for name in ("dy", "dq", "dk", "dv"))
        datt = self._scratch("datt", att.shape, self.act_dtype)
        grouped = _grouped(KV)
        self._launch(self._k("attention_unpermute_backward"), grid_1d(dy.size, self.block), dy, dout, B, T,
                     n_head, hs)
        self._bmm(grouped(datt), grouped(dy), v, trans_b=True)
        self._bmm(dv, self._dropped(att, drop), dy, trans_a=True)  # per query head
        if drop:
            self.dropout(datt, datt, *drop)  # through the dropout: the same mask
        self._launch(self._k("softmax_causal_backward"), grid_rows(B * n_head * T), datt, datt, att,
                     B * n_head, T, 1.0 / math.sqrt(hs))
        self._bmm(grouped(dq), grouped(datt), k)
        self._bmm(dk, datt, q, trans_a=True)  # per query head
        self._launch(self._k("attention_permute_backward"), grid_1d(dq.size, self.block), dqkv, dq, dk, dv, B, T,
                     n_head, KV, hs)

    def _dropped(self, att, drop):
        """att, or dropout(att) in a per-thread scratch buffer (recomputed by the backward)."""
        if not drop:
            return att
        out = self._scratch("att_dropped", att.shape, att.dtype)
        self.dropout(out, att, *drop)
        return out

    # --- pointwise ---
    def gelu_forward(self, out, inp):
        self._launch(self._k("gelu_forward"), grid_1d(inp.size, self.block), out, inp, inp.size)

    def gelu_backward(self, dinp, inp, dout):
        self._launch(self._k("gelu_backward"), grid_1d(inp.size, self.block), dinp, inp, dout, inp.size)

    def swiglu_forward(self, out, gu):
        """out[N,I] = silu(gate) * up of gu[N,2I] = [gate | up]."""
        I = out.shape[-1]
        N = out.size // I
        self._launch(self._k("swiglu_forward"), grid_1d(N * I, self.block), out, gu, N, I)

    def swiglu_backward(self, dgu, gu, dout):
        I = dout.shape[-1]
        N = dout.size // I
        self._launch(self._k("swiglu_backward"), grid_1d(N * I, self.block), dgu, gu, dout, N, I)

    # --- rotary embeddings (Llama), in place on qkv's q and k heads; cos, sin float32 [T, hd/2] ---
    def rope_forward(self, qkv, cos, sin, n_head, n_kv_head):
        self._rope("rope_forward", qkv, cos, sin, n_head, n_kv_head)

    def rope_backward(self, dqkv, cos, sin, n_head, n_kv_head):
        self._rope("rope_backward", dqkv, cos, sin, n_head, n_kv_head)

    def _rope(self, kernel: str, x, cos, sin, n_head: int, KV: int) -> None:
        B, T, W = x.shape
        hd = W // (n_head + 2 * KV)
        self._launch(self._k(kernel), grid_1d(B * T * (n_head + KV) * (hd // 2), self.block), x, cos, sin, B, T,
                     n_head, KV, hd)

    def residual_forward(self, out, a, b):
        self._launch(self._k("residual_forward"), grid_1d(out.size, self.block), out, a, b, out.size)

    def dropout(self, out, inp, key, threshold, scale):
        keys, slot = self._key_slot(key)
        self._launch(self._k("dropout"), grid_1d(inp.size, self.block), out, inp, keys, slot, threshold, scale,
                     inp.size)

    def _key_slot(self, key: int):
        """(device int64 array, index) holding key: its staged slot (`stage`), or, for a key that
        was not staged (op tests), a per-thread spare written now."""
        hit = self._local.__dict__.get("key_slots", {}).get(key)
        if hit is not None:
            return hit
        self._no_capture("a dropout key that was not staged")
        spare = self._scratch("spare_key", (1,), "int64")
        self.upload(spare, np.array([key], np.int64))
        return spare, 0

    # --- loss: rows of Vp logits, the vocabulary the first V (vocab_columns), the padding written 0 ---
    def crossentropy_forward(self, losses, probs, logits, targets, vocab=None):
        Vp = logits.shape[-1]
        N = logits.size // Vp
        self._launch(self._k("crossentropy_forward"), grid_rows(N), losses, probs, logits, targets, N,
                     vocab_columns(logits, vocab), Vp)

    def crossentropy_forward_backward(self, losses, dlogits, logits, targets, dloss, vocab=None):
        """Losses and dlogits in two passes over each row (online max and sum, then the write)."""
        Vp = logits.shape[-1]
        N = logits.size // Vp
        self._launch(self._k("crossentropy_forward_backward"), grid_rows(N), losses, dlogits, logits, targets,
                     N, vocab_columns(logits, vocab), Vp, dloss)

    def crossentropy_backward(self, dlogits, probs, targets, dloss, vocab=None):
        Vp = probs.shape[-1]
        N = probs.size // Vp
        self._launch(self._k("crossentropy_backward"), grid_1d(N * Vp, self.block), dlogits, probs, targets, N,
                     vocab_columns(probs, vocab), Vp, dloss)

    def _reduce(self, kernel: str, x, out=None) -> float | None:
        partial = self._scratch("partial", (REDUCE_BLOCKS,), "float64")
        self._launch(kernel, (REDUCE_BLOCKS, 1, 1), partial, x, x.size)
        return self._sum_partials(partial, out)

    def _sum_partials(self, partial, out=None) -> float | None:
        """The REDUCE_BLOCKS partial sums added in a fixed order: as a host float, or into out[0]
        (a device float64, nothing read back: graph steps)."""
        total = self._scratch("total", (1,), "float64") if out is None else out
        self._launch("sum_doubles", (1, 1, 1), total, partial, REDUCE_BLOCKS)
        if out is None:
            return float(self.to_host(total)[0])  # synchronizes this thread's stream only
        return None

    def sum_losses(self, losses, out=None):
        return self._reduce("sum_partial", losses.reshape(-1), out)

    # --- reducer and optimizer ---
    def add_inplace(self, acc, x):
        self._launch("add_inplace", grid_1d(acc.size, self.block), acc, x, acc.size)

    def scale_inplace(self, x, s):
        self._launch("scale_inplace", grid_1d(x.size, self.block), x, s, x.size)

    def sum_squares(self, x, out=None):
        return self._reduce("sum_squares_partial", x, out)

    def reduce_slots(self, slots, pairs, start, end, inv_m, out=None):
        rows = pairs.tolist()  # pairs: a host array
        if not rows or rows[-1][0] != 0:
            for dst, src in rows:
                self.add_inplace(slots[dst, start:end], slots[src, start:end])
            self.scale_inplace(slots[0, start:end], inv_m)
            return self.sum_squares(slots[0, start:end], out)
        for dst, src in rows[:-1]:
            self.add_inplace(slots[dst, start:end], slots[src, start:end])
        # the tree's last addition (into slot 0), the 1/M scale and the norm's partial sums in one
        # kernel: bitwise add_inplace, scale_inplace, then sum_squares_partial
        acc, x = slots[0, start:end], slots[rows[-1][1], start:end]
        partial = self._scratch("partial", (REDUCE_BLOCKS,), "float64")
        self._launch("add_scale_sum_squares_partial", (REDUCE_BLOCKS, 1, 1), acc, x, inv_m, partial, acc.size)
        return self._sum_partials(partial, out)

    def step_scalars(self, out, scalars, chunk_sums, losses, max_norm: float) -> None:
        """The step's norm into out[0], the clipping factor and skip flag into AdamW's device
        scalars, from the chunks' sums of squares and the micro-batches' losses (graph steps)."""
        self._launch("step_scalars", (1, 1, 1), out, scalars, chunk_sums, chunk_sums.size, losses, losses.size,
                     max_norm)

    def adamw_update(self, params, grads, m, v, ranges, scalars, compute=None):
        # ranges: host [K,3] rows covering [start, end) contiguously; the kernel runs on that
        # slice with the rows shifted to start at 0. compute: the bf16 weight copy, written in the
        # same pass (None, or params itself: nothing to copy)
        # scalars: AdamWScalars (uploaded once per thread and value), or a device float32[10] (graphs)
        start, end = int(ranges[0, 0]), int(ranges[-1, 1])
        dev = self._device_ranges(ranges, start)
        s = self._device_scalars(scalars) if isinstance(scalars, AdamWScalars) else scalars
        n = end - start
        if compute is not None and compute is not params:
            self._launch("adamw_update_copy_bf16", grid_1d(n, self.block), params[start:end], compute[start:end],
                         grads[start:end], m[start:end], v[start:end], dev, dev.shape[0], n, s)
            return
        self._launch("adamw_update", grid_1d(n, self.block), params[start:end], grads[start:end],
                     m[start:end], v[start:end], dev, dev.shape[0], n, s)

    def muon_momentum(self, m, grads, ranges, momentum, nesterov, grad_scale):
        # float32 array expressions on each range (elementwise: any order gives the same bits)
        self._no_capture("Muon's momentum")
        f = np.float32
        mom, one_minus = f(momentum), f(1.0 - momentum)
        for start, end in ranges[:, :2].tolist():
            g = grads[start:end] * f(grad_scale)
            mi = m[start:end]
            mi *= mom
            mi += one_minus * g
            if nesterov:
                g *= one_minus
                g += mom * mi
                grads[start:end] = g
            else:
                grads[start:end] = mi

    def muon_orthogonal_update(self, p, u, steps, coeffs, decay, step_size):
        # Newton-Schulz on this thread's stream, deterministic: cupy's cuBLAS products in float32
        # (the run's compute type: fp32 pedantic, tf32 under --precision tf32), or under bf16
        # cuBLASLt's products of bf16 inputs (the reference's bf16 iteration, _newton_schulz_bf16)
        self._no_capture("Muon's Newton-Schulz")
        f = np.float32
        a, b, c = (f(k) for k in coeffs)
        wide = u.shape[0] <= u.shape[1]
        x = (u if wide else u.T).copy()  # contiguous
        x /= f(math.sqrt(self.sum_squares(x.reshape(-1))) + 1e-7)
        if self.bf16:
            x = self._newton_schulz_bf16(x, steps, a, b, c)
        else:
            for _ in range(steps):
                A = self.cp.matmul(x, x.T)
                B = b * A + c * self.cp.matmul(A, A)
                x = a * x + self.cp.matmul(B, x)
        p *= f(decay)
        p -= f(step_size) * (x if wide else x.T)

    def _newton_schulz_bf16(self, x, steps, a, b, c):
        """x[r, n] (float32, r <= n) after `steps` iterations A = X X^T, B = b A + c A A,
        X = a X + B X whose three products take bf16 inputs with float32 accumulation and output
        (cuBLASLt, one fixed algorithm per shape: deterministic); X, A and B stay float32 between
        the products, each rounded to bf16 once as a product's input (the reference rounds them
        to bf16 as it stores them, and each elementwise result too)."""
        r, n = x.shape
        lt = self._lt()
        xh, ah, bh = (self.empty(shape, self.act_dtype) for shape in ((r, n), (r, r), (r, r)))
        A, AA, Y = self.empty((r, r)), self.empty((r, r)), self.empty((r, n))
        for _ in range(steps):
            self._to_bf16(xh, x)
            self._count()
            self._issue(lt.gemm, A, xh, xh, trans_b=True)  # A = X X^T
            self._to_bf16(ah, A)
            self._count()
            self._issue(lt.gemm, AA, ah, ah)  # A A
            B = b * A + c * AA
            self._to_bf16(bh, B)
            self._count()
            self._issue(lt.gemm, Y, bh, xh)  # B X
            x = a * x + Y
        return x

    def _to_bf16(self, out, x) -> None:
        """out (bf16, x's shape) = x (float32, contiguous) rounded to nearest even."""
        self._launch("cast_to_bf16", grid_1d(x.size, self.block), out, x, x.size)

    def reserve_flat_ops(self, ranges) -> None:
        """Allocate, for the calling thread, what its flat-buffer ops use (the reduction partials,
        the device copy of AdamW's ranges), so that a capture of them allocates nothing."""
        self._scratch("partial", (REDUCE_BLOCKS,), "float64")
        self._device_ranges(ranges, int(ranges[0, 0]))

    def _device_scalars(self, scalars: AdamWScalars):
        """This thread's device copy of the step's AdamW scalars (written when they change)."""
        held = self._local.__dict__.get("adamw_scalars")
        if held is None or held[0] != scalars:
            dev = held[1] if held else self._scratch("adamw_scalars", (ADAMW_SCALARS,), "float32")
            self.upload(dev, scalars.packed())
            held = self._local.adamw_scalars = (scalars, dev)
        return held[1]

    def _device_ranges(self, ranges, start: int):
        """A per-thread device copy of host ranges, shifted by -start (made once per array)."""
        store = self._local.__dict__.setdefault("ranges", {})
        key = (id(ranges), start)
        if key not in store:
            self._no_capture("the AdamW ranges' first use")
            shifted = ranges.copy()
            shifted[:, :2] -= start
            store[key] = (ranges, self.cp.asarray(shifted))  # keep `ranges` alive: id stays unique
        return store[key][1]


def token_buckets(idx, vocab_size: int):
    """(positions int32[B*T], starts int32[V+1]) of host token ids: bucket v, the positions of
    token v in ascending order, is positions[starts[v]:starts[v+1]] (a stable sort: no atomics,
    the same buckets every time)."""
    flat = np.asarray(idx).reshape(-1)
    positions = np.argsort(flat, kind="stable").astype(np.int32)
    starts = np.zeros(vocab_size + 1, np.int32)
    np.cumsum(np.bincount(flat, minlength=vocab_size)[:vocab_size], out=starts[1:])
    return positions, starts


def _rows(a):
    """View [..., K] as [N, K] (no copy; the arrays are contiguous)."""
    return a.reshape(-1, a.shape[-1])


def _grouped(KV: int):
    """View x[B, NH, X, Y] as [B, KV, (NH/KV) X, Y]: the g = NH/KV query heads of kv head h, whose
    rows all meet k[b, h] and v[b, h] (no copy; the arrays are contiguous)."""
    return lambda x: x.reshape(x.shape[0], KV, -1, x.shape[-1])


def _cudnn_dropout(drop):
    """crystal's (key, threshold, scale) as cuDNN's (p, seed, offset): the Philox seed is the
    site's key, a function of (seed, step, micro-batch, layer), so every sphere and resume
    draws the same mask (cuDNN's own, not crystal's hash)."""
    if not drop:
        return None
    key, threshold, _ = drop
    return threshold / 2 ** 32, key, 0


@contextlib.contextmanager
def _cudnn_errors():
    """A graph this cuDNN cannot run is the environment's limit, said in one line with the way out."""
    from crystal.backends.cudnn_attention import FlashAttentionError
    from crystal.errors import CrystalError

    try:
        yield
    except FlashAttentionError as e:
        raise CrystalError(f"{e}; set CRYSTAL_CUDNN=0 to run attention through cuBLAS") from None


def _ml_bfloat16():
    import ml_dtypes  # the numpy bf16 type of the emulated backend's arrays (tests)

    return ml_dtypes.bfloat16


def _lt_libraries(device, bf16: bool):
    """(cuBLASLt bindings, cuDNN frontend or None (bf16 only)) on `device`, or a one-line
    CrystalError saying what is missing."""
    from crystal.errors import CrystalError

    cc = int(device.compute_capability)
    if not bf16:
        return _import_cublaslt("--cuda-graphs"), None
    if cc < 80:
        raise CrystalError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer; "
                           f"this one is {cc // 10}.{cc % 10} (use fp32 or tf32)")
    cublasLt = _import_cublaslt("--precision bf16")
    from crystal.backends.cudnn_attention import unavailable_reason

    cudnn = None
    if os.environ.get("CRYSTAL_CUDNN", "1") != "0" and unavailable_reason() is None:
        import cudnn
    return cublasLt, cudnn


def _import_cublaslt(what: str):
    """nvmath's cuBLASLt bindings, or a one-line CrystalError saying `what` needs them."""
    from crystal.errors import CrystalError

    try:
        from nvmath.bindings import cublasLt
    except Exception as e:
        raise CrystalError(f"{what} needs nvmath-python for cuBLASLt (pip install 'crystal[cuda]'): "
                           f"{type(e).__name__}") from None
    return cublasLt


def set_matmul_precision(precision: str) -> None:
    """cuBLAS compute type of cupy's float32 products, for the whole process: "tf32" (tensor
    cores, 10-bit mantissa inputs) or "fp32" (CUBLAS_COMPUTE_32F_PEDANTIC: full fp32 throughout)."""
    from cupy._core import _routines_linalg as linalg

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if precision == "tf32"
                            else linalg.COMPUTE_TYPE_PEDANTIC)


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here (one line), or None when it can."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install 'crystal[cuda]')"
    except Exception as e:  # a broken cupy install
        return f"cupy failed to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"no usable CUDA GPU ({msg})"
    if n < 1:
        return "no CUDA GPU found"
    if not any(kernels_dir().glob("*.cu")):
        return f"no CUDA kernels found in {kernels_dir()}"
    return None
