"""CUDA graphs of decode steps (crystal.generate.Decoder with graphs=True, a cuda backend made for
graphs: every product through cuBLASLt, which a capture can record).

A decode step of the first B rows is one forward over [B, 1] tokens whose every pointer is fixed
once B is: the workspace of [B, 1], this thread's scratch (the attention's scores), the cache's
first B rows, the weights. What changes from step to step (each row's token, its position, -1
for a row that sits out) is read from one device buffer of [3, B] int32, written by one
host-to-device copy before each replay. So, per B:
- the first step is eager, reading that buffer (every buffer and kernel made, as in training);
- the second is captured (nothing allocates, reads back or synchronizes inside) and launched;
- every later one is the copy, one graph launch and the logits' read back.
The kernels and their arguments are those of the eager step: a replayed step gives the eager
step's bits (tested under the emulator). All of it runs on a stream of its own (a capture cannot
use the legacy default stream), ordered after the default stream's work (the prefill, a refill)
by an event, and the default stream after it.

A capture that fails (GraphCaptureError) leaves graphs off for the decoder (`failed` says why);
it goes on eagerly, with the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Step:
    """The fixed buffers of a decode step of B rows, and its graph once captured."""

    inputs: object  # device int32 [3, B]: tokens, positions, rows (each row's own 0)
    cache: object  # the KVCache of rows 0..B-1 (views made once: their pointers are the graph's)
    graph: object = None


class DecodeGraphs:
    def __init__(self, decoder, forward):
        self.decoder = decoder
        self.forward = forward  # crystal.generate.forward, handed in (generate imports this module)
        self.steps: dict[int, _Step] = {}
        self.failed: str | None = None
        self.captures = 0
        self.replays = 0

    def run(self, ws, idx: np.ndarray, pos: np.ndarray):
        """The decode step of tokens idx [B, 1] at positions pos [B] into ws (the workspace of
        [B, 1]); the logits stay in ws.logits (the caller reads them back)."""
        from crystal.backends.cuda import ROOT_STREAM
        from crystal.errors import GraphCaptureError

        dec, be = self.decoder, self.decoder.be
        B = idx.shape[0]
        host = np.stack([idx[:, 0], pos, np.zeros(B)]).astype(np.int32)
        entry = be.record_event()  # the default stream's work so far (the prefill, a refill)
        with be.sphere_context(ROOT_STREAM):
            be.wait_event(entry)
            step = self.steps.get(B)
            first = step is None
            if first:
                cache = dec.cache if B == dec.batch else dec.cache.rows(0, B)
                step = self.steps[B] = _Step(be.to_device(host), cache)
            else:
                be.upload(step.inputs, host)
            tokens, positions, rows = step.inputs[0][:, None], step.inputs[1], step.inputs[2]

            def body():
                self.forward(be, dec.ops, dec.config, dec.weights, ws, step.cache, tokens, positions, rows)

            if first or self.failed is not None:
                body()
            else:
                if step.graph is None:
                    try:
                        step.graph = self._capture(body)
                    except GraphCaptureError as e:
                        self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
                        body()
                if step.graph is not None:
                    be.launch_graph(step.graph)
                    self.replays += 1
            done = be.record_event()
        be.wait_event(done)

    def _capture(self, body):
        be = self.decoder.be
        be.begin_capture()
        try:
            body()
        except BaseException:
            try:
                be.end_capture()
            except Exception:
                pass
            raise
        graph = be.end_capture()
        self.captures += 1
        return graph
