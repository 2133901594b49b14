"""The cuda backend's host code on numpy arrays, with the CPU-emulated kernels (and, for bf16,
numpy stand-ins of cuBLASLt and cuDNN): crystal.backends.cuda.CudaBackend, minus the GPU.

CUDA graphs are played, not run: `begin_capture` starts recording the calling thread's device
work (every kernel launch and library call the backend issues goes through `_issue`), and
`launch_graph` replays the record in order, with the arguments it was recorded with, as a CUDA
graph does. The array module is instrumented: while a thread captures, any allocation through
it, any read back or synchronization fails the capture, and at `end_capture` every array the
record touches must have existed before the capture began (an array made by an array method
inside the capture, such as x.astype(...), is caught there).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np

from crystal.backends.cuda import CudaBackend
from crystal.errors import GraphCaptureError
from emu.build import build

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

    def __init__(self, capturing):
        self._capturing = capturing
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
    precision "bf16" takes `lt` (a cuBLASLt stand-in, required) and `cudnn` (a cuDNN stand-in,
    or None for the cuBLAS + softmax attention path). graphs=True: every product through `lt`
    (a stand-in is made when none is given), as on a GPU with --cuda-graphs."""

    def __init__(self, precision: str = "fp32", lt=None, cudnn=None, flash: bool = True, graphs: bool = False):
        if graphs and lt is None:
            from lt_standin import LtStandIn

            lt = LtStandIn()
        self.arrays = GuardedArrayModule(self.capturing)
        super().__init__(precision, block=32, array_module=self.arrays, launcher=build().launch, lt=lt,
                         cudnn=cudnn, flash=flash, graphs=graphs)
        self.name = "cuda-emulated"
        self.captures = 0

    def to_host(self, array):
        self._no_capture("a read back to the host")
        return np.asarray(array)

    def sphere_context(self, index):
        return contextlib.nullcontext()

    def record_event(self):
        return None

    def wait_event(self, event):
        pass

    def synchronize(self):
        self._no_capture("a synchronization")

    # --- graphs, played: record, then replay the record ---
    def begin_capture(self) -> None:
        self._no_capture("a nested capture")
        self._local.recording = []
        self._local.capturing = True

    def end_capture(self) -> RecordedGraph:
        ops, self._local.recording, self._local.capturing = self._local.recording, None, False
        for fn, args, kwargs in ops:
            for a in (getattr(fn, "__self__", None), *args, *kwargs.values()):
                if isinstance(a, np.ndarray) and not self.arrays.known(a):
                    raise GraphCaptureError(f"an array made inside a CUDA graph capture ({a.dtype}{list(a.shape)})")
        self.captures += 1
        return RecordedGraph(ops)

    def launch_graph(self, graph: RecordedGraph) -> None:
        self._count()
        for fn, args, kwargs in graph.ops:
            fn(*args, **kwargs)
