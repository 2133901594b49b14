"""The cuda backend's host code on numpy arrays, with the CPU-emulated kernels (and, for bf16,
numpy stand-ins of cuBLASLt and cuDNN): crystal.backends.cuda.CudaBackend, minus the GPU.

CUDA graphs are played, not run: `begin_capture` starts recording the calling thread's device
work (every kernel launch and library call the backend issues goes through `_issue`), and
`launch_graph` replays the record in order, with the arguments it was recorded with, as a CUDA
graph does. The array module is instrumented: while a thread captures, any allocation through
it, any read back or synchronization fails the capture, and at `end_capture` every array the
record touches must have existed before the capture began (an array made by an array method
inside the capture, such as x.astype(...), is caught there).

Streams are ints, as on a GPU: each `sphere_context(i)` runs on a stream of its own, the rest on
0 (the legacy default stream); the backend and its library stand-ins share one EmulatedDevice
(tests/emu/device.py). A library call issued during a capture (a cuBLASLt product, a cuDNN graph)
runs its host code at capture time, as on a GPU: the stand-in checks its arguments and stream
then, and records its device work, which the replay runs at the addresses given at capture.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np

from crystal.backends.cublaslt import LtMatmul
from crystal.backends.cuda import CudaBackend
from crystal.backends.cudnn_attention import FlashAttention
from crystal.errors import GraphCaptureError
from emu.build import build
from emu.device import EmulatedDevice, StreamCaptureError

FIRST_STREAM = 0x5000  # sphere i runs on stream FIRST_STREAM + 1 + i (the root's own: FIRST_STREAM)

ALLOCATING = ("empty", "zeros", "ones", "full", "asarray", "array", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "ascontiguousarray", "concatenate", "stack", "copy")


class RecordedGraph:
    """What a capture recorded: (fn, args, kwargs) in issue order."""

    def __init__(self, ops: list):
        self.ops = ops

    def __len__(self) -> int:
        return len(self.ops)


class GuardedArrayModule:
    """numpy, except that its allocating functions refuse a capturing thread, and every array
    they return is registered as allocated outside any capture."""

    def __init__(self, capturing, device: EmulatedDevice):
        self._capturing = capturing
        self._device = device
        self._known: dict[int, weakref.ref] = {}  # id(owner) -> the owning array (arrays are unhashable)
        self._lock = threading.Lock()

    def __getattr__(self, name):
        fn = getattr(np, name)
        if name not in ALLOCATING:
            return fn

        def guarded(*args, **kwargs):
            if self._capturing():
                raise GraphCaptureError(f"an allocation (np.{name}) inside a CUDA graph capture")
            out = fn(*args, **kwargs)
            self.register(out)
            return out
        return guarded

    def register(self, a) -> None:
        if isinstance(a, np.ndarray):
            owner = _owner(a)
            self._device.register(owner)
            with self._lock:
                self._known[id(owner)] = weakref.ref(owner, lambda _, k=id(owner): self._known.pop(k, None))

    def known(self, a) -> bool:
        owner = _owner(a)
        with self._lock:
            ref = self._known.get(id(owner))
        return ref is not None and ref() is owner


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class EmulatedCudaBackend(CudaBackend):
    """CudaBackend with numpy arrays and emulated kernels; streams and events are no-ops.
    `lt`: a cuBLASLt stand-in (one is made when none is given): bf16's products, every product
    with graphs=True (as on a GPU with --cuda-graphs), and in fp32 without graphs the column-block
    products (matmul_columns_*) only. `cudnn`: a cuDNN stand-in (bf16), or None for the cuBLAS +
    softmax attention path."""

    def __init__(self, precision: str = "fp32", lt=None, cudnn=None, flash: bool = True, graphs: bool = False):
        if lt is None:
            from lt_standin import LtStandIn

            lt = LtStandIn()
        self.device = EmulatedDevice()
        for library in (lt, cudnn):  # the stand-ins issue their device work on this device's streams
            if library is not None:
                library.device = self.device
        self.arrays = GuardedArrayModule(self.capturing, self.device)
        super().__init__(precision, block=32, array_module=self.arrays, launcher=build().launch, lt=lt,
                         cudnn=cudnn, flash=flash, graphs=graphs)
        self._stream_ptr = lambda: self._local.__dict__.get("stream", 0)
        self.name = "cuda-emulated"
        self.captures = 0

    def to_host(self, array):
        self._no_capture("a read back to the host")
        return np.asarray(array)

    @contextlib.contextmanager
    def sphere_context(self, index):
        outer = self._local.__dict__.get("stream", 0)
        self._local.stream = FIRST_STREAM + 1 + index
        try:
            yield
        finally:
            self._local.stream = outer

    def record_event(self):
        return None

    def wait_event(self, event):
        pass

    def synchronize(self):
        self._no_capture("a synchronization")

    # --- graphs, played: record, then replay the record ---
    def begin_capture(self) -> None:
        self._no_capture("a nested capture")
        record = []
        try:
            self.device.begin_capture(self._stream_ptr(), record)
        except StreamCaptureError as e:
            raise GraphCaptureError(str(e)) from None
        self._local.recording = record
        self._local.capturing = True

    def end_capture(self) -> RecordedGraph:
        self.device.end_capture(self._stream_ptr())
        ops, self._local.recording, self._local.capturing = self._local.recording, None, False
        for fn, args, kwargs in ops:
            for a in (getattr(fn, "__self__", None), *args, *kwargs.values()):
                if isinstance(a, np.ndarray) and not self.arrays.known(a):
                    raise GraphCaptureError(f"an array made inside a CUDA graph capture ({a.dtype}{list(a.shape)})")
        self.captures += 1
        return RecordedGraph(ops)

    def _issue(self, fn, *args, **kwargs) -> None:
        """A library call's host code runs now, also during a capture (its stand-in records the
        device work into the capture of the stream it is given); kernel launches are recorded."""
        if self.capturing() and isinstance(getattr(fn, "__self__", None), (LtMatmul, FlashAttention)):
            fn(*args, **kwargs)
            return
        super()._issue(fn, *args, **kwargs)

    def launch_graph(self, graph: RecordedGraph) -> None:
        self._count()
        for fn, args, kwargs in graph.ops:
            fn(*args, **kwargs)
