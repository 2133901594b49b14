"""What the library stand-ins and the emulated backend share of a GPU: its streams and its memory.

Streams. A stream is an int, as the libraries see it (cupy's `Stream.ptr`): 0 is cupy's null
stream, the legacy default stream, and 1 and 2 are CUDA's cudaStreamLegacy and
cudaStreamPerThread handles. A thread that captures stream S (`begin_capture`, thread-local
mode, as crystal captures) collects the device work issued to S into a record instead of running
it; `launch` is how a stand-in issues device work, so a library call made during a capture runs
its host side now (argument checks, pointer conversions) and its device side at each replay,
reading and writing memory at the addresses it was given at capture time: what a CUDA graph does.

Rules enforced, from CUDA's stream-capture rules (cudaStreamBeginCapture, thread-local mode):
- the legacy default stream cannot be captured (cudaErrorStreamCaptureUnsupported);
- a thread that is capturing S issues library work to S only: work sent to another stream is not
  in the graph (and to the legacy stream it is cudaErrorStreamCaptureImplicit);
- an event recorded on the capturing stream that a stream outside the capture waits on is a
  dependency the capture does not know (cudaErrorStreamCaptureIsolation / Unjoined at the end):
  `export_without_stream` is that wait, made by cupy's `ndarray.__dlpack__()` when the consumer
  names no stream (cupy/_core/core.pyx: `stream=None` means the legacy stream, which waits on an
  event recorded on cupy's current stream), as cudnn-frontend's `_get_data_ptr` does.

Memory. Allocations registered here (the emulated backend registers every array its array module
makes) are known by identity: a capture resolves each address it records to the allocation that
holds it, and a replay refuses one whose allocation has been freed since (a graph that points at
freed memory), whatever address the allocator has handed out since.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import numpy as np

LEGACY_STREAMS = (0, 1, 2)  # cupy's null stream (legacy), cudaStreamLegacy, cudaStreamPerThread


class StreamCaptureError(RuntimeError):
    """What the CUDA runtime answers for a capture-breaking call (one line, its error's name first)."""


class EmulatedDevice:
    """Streams (which are captured, by which thread, into what record) and live allocations."""

    def __init__(self):
        self._lock = threading.RLock()  # reentrant: a freed array's weakref callback may run under it
        self._captures: dict[int, tuple[int, list]] = {}  # stream -> (capturing thread id, record)
        self._allocations: dict[int, tuple[int, int, weakref.ref]] = {}  # key -> (start, end, owner)
        self._keys = itertools.count(1)
        self.legacy_waits = 0  # event waits of the legacy stream on another stream (eager ones)

    # --- streams ---
    def begin_capture(self, stream: int, record: list) -> None:
        if stream in LEGACY_STREAMS:
            raise StreamCaptureError("cudaErrorStreamCaptureUnsupported: the legacy default stream cannot be captured")
        with self._lock:
            if stream in self._captures:
                raise StreamCaptureError(f"cudaErrorIllegalState: stream {stream} is already capturing")
            self._captures[stream] = (threading.get_ident(), record)

    def end_capture(self, stream: int) -> None:
        with self._lock:
            self._captures.pop(stream, None)

    def captured(self, stream: int, body) -> list:
        """The record of what body() issues while the calling thread captures `stream`."""
        record = []
        self.begin_capture(stream, record)
        try:
            body()
        finally:
            self.end_capture(stream)
        return record

    def capturing(self) -> int | None:
        """The stream the calling thread is capturing, or None."""
        me = threading.get_ident()
        with self._lock:
            return next((s for s, (thread, _) in self._captures.items() if thread == me), None)

    def launch(self, stream: int, what: str, work, addresses=()) -> None:
        """Device work of a library call on `stream`: run now, or, while the calling thread
        captures `stream`, appended to the capture's record. addresses: the memory the work
        touches, resolved to their allocations now and checked alive at each replay."""
        captured = self.capturing()
        if captured is None:
            work()
            return
        if stream != captured:
            name = "cudaErrorStreamCaptureImplicit" if stream in LEGACY_STREAMS else "cudaErrorStreamCaptureIsolation"
            raise StreamCaptureError(f"{name}: {what} issued to stream {stream} while this thread captures stream "
                                     f"{captured} (the graph would not hold it)")
        held = [(ptr, self.allocation(ptr)) for ptr in addresses if ptr]

        def replay():
            for ptr, key in held:
                if key is not None and not self.alive(key):
                    raise StreamCaptureError(f"cudaErrorIllegalAddress: a replay of {what} reads or writes "
                                             f"{ptr:#x}, memory freed since the capture")
            work()

        with self._lock:
            record = self._captures[stream][1]
        record.append((replay, (), {}))

    def export_without_stream(self, stream: int, what: str) -> None:
        """cupy's `__dlpack__()` with no stream, on a thread whose current stream is `stream`:
        the legacy stream waits on an event recorded on `stream` (nothing when they are the same)."""
        if stream in LEGACY_STREAMS:
            return
        if self.capturing() == stream:
            raise StreamCaptureError(f"cudaErrorStreamCaptureIsolation: {what}: a DLPack export without a stream "
                                     f"makes the legacy stream wait on the capturing stream {stream}")
        with self._lock:
            self.legacy_waits += 1

    # --- memory ---
    def register(self, array) -> None:
        """Record a live allocation (its owning numpy array), until that array is freed."""
        if not isinstance(array, np.ndarray):
            return
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        start = int(owner.ctypes.data)
        key = next(self._keys)
        with self._lock:
            self._allocations[key] = (start, start + owner.nbytes, weakref.ref(owner, lambda _: self._free(key)))

    def _free(self, key: int) -> None:
        with self._lock:
            self._allocations.pop(key, None)

    def allocation(self, ptr: int) -> int | None:
        """The live registered allocation holding address ptr, or None (memory this device does not track)."""
        with self._lock:
            return next((k for k, (start, end, _) in self._allocations.items() if start <= ptr < end), None)

    def alive(self, key: int) -> bool:
        with self._lock:
            return key in self._allocations
