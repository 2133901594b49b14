"""The LM head's vocabulary padded to a multiple of 64 (crystal's layout) against no padding, side by side.

Usage: python bench/bench_vocab_pad.py [--device cpu|cuda] [--rounds 5] [--reps 20] [--json OUT]

One micro-batch (forward with the loss and dlogits, then backward) of the small preset's shape
(4 layers, 128 wide, 1 x 64 tokens) at vocabularies that are no multiple of 64: 333 (-> 384),
1000 (-> 1024) and GPT-2's 50257 (-> 50304). The unpadded twin is the same model with
`padded_vocab_size` = vocab_size, which every layout-dependent piece (ParamLayout, Activations)
reads; both start from the same parameters. Rounds alternate padded and unpadded (A B, B A, ...),
each the mean ms of --reps micro-batches (on the cpu the thread's cpu time: one thread, BLAS
in it); the figure is the median over rounds, and the ratio padded / unpadded (below 1: padding
pays).
"""

import argparse
import dataclasses
import json
import platform
import statistics
import time

import numpy as np

from crystal.backends import get_backend
from crystal.backends.cpu import blas_threads
from crystal.config import ModelConfig
from crystal.model import Activations, ParamLayout, Tensors, backward, forward, init_params, warm_up


class Unpadded(ModelConfig):
    """The same model with the LM head's rows = the vocabulary (no padding)."""

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size


class MicroBatch:
    def __init__(self, be, cfg: ModelConfig, start: np.ndarray, B: int, T: int, seed: int = 0):
        layout = ParamLayout(cfg)
        self.be, self.cfg = be, cfg
        self.w = Tensors(layout, be.to_device(layout.padded(start)))
        self.g = Tensors(layout, be.empty(layout.size))
        self.a = Activations(be, cfg, B, T)
        rng = np.random.default_rng(seed)
        self.idx, self.tgt = (be.to_device(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32))
                              for _ in range(2))

    def run(self, n: int) -> float:
        """Mean ms of one micro-batch over n: the thread's cpu time on the cpu backend (one
        thread, BLAS in it: what a shared, loaded machine's wall clock blurs), wall time on cuda."""
        clock = time.thread_time if self.be.name == "cpu" else time.perf_counter
        t = clock()
        for _ in range(n):
            forward(self.be, self.cfg, self.w, self.a, self.idx, self.tgt, grad=True)
            backward(self.be, self.cfg, self.w, self.g, self.a, self.idx, self.tgt)
        self.be.synchronize()
        return (clock() - t) / n * 1e3


def compare(be, vocab: int, rounds: int, reps: int) -> dict:
    padded = ModelConfig(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128)
    plain = Unpadded(**dataclasses.asdict(padded))
    start = ParamLayout(padded).unpadded(init_params(padded, 0))  # the model's values, either layout
    runs = {"padded": MicroBatch(be, padded, start, 1, 64), "unpadded": MicroBatch(be, plain, start, 1, 64)}
    losses = {k: forward(be, mb.cfg, mb.w, mb.a, mb.idx, mb.tgt) for k, mb in runs.items()}
    ms = {k: [] for k in runs}
    for mb in runs.values():
        mb.run(max(2, reps // 5))  # warm caches and the BLAS path
    for r in range(rounds):  # A B, B A, A B, ...: drifts of the machine fall on both alike
        for k in (("padded", "unpadded") if r % 2 == 0 else ("unpadded", "padded")):
            ms[k].append(runs[k].run(reps))
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"vocab": vocab, "padded_vocab": padded.padded_vocab_size,
            "padded_ms": round(med["padded"], 3), "unpadded_ms": round(med["unpadded"], 3),
            "ratio": round(med["padded"] / med["unpadded"], 3),
            "loss_rel_diff": abs(losses["padded"] - losses["unpadded"]) / losses["unpadded"],
            "rounds_ms": {k: [round(x, 3) for x in v] for k, v in ms.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--vocab", type=int, nargs="+", default=[333, 1000, 50257])
    p.add_argument("--json")
    a = p.parse_args()
    be = get_backend(a.device)
    warm_up(be)
    rows = []
    with blas_threads(1):
        for v in a.vocab:
            reps = a.reps if v < 10_000 else max(3, a.reps // 4)
            r = compare(be, v, a.rounds, reps)
            rows.append(r)
            print(f"vocab {r['vocab']:>6} -> {r['padded_vocab']:>6}: padded {r['padded_ms']:8.3f} ms, "
                  f"unpadded {r['unpadded_ms']:8.3f} ms per micro-batch, ratio {r['ratio']:.3f} "
                  f"(loss rel diff {r['loss_rel_diff']:.1e})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "machine": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d"), "rounds": a.rounds, "reps": a.reps, "results": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
