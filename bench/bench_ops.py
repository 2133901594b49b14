"""One micro-batch of the cpu backend up close: time per op family, Python overhead, GIL waits.

Usage: python bench/bench_ops.py [--preset small|llama-small] [--reps 300] [--json OUT]

1. Per op family: a forward + backward of one micro-batch (the preset's batch_size x seq_len),
   one thread, through TimedBackend, averaged over --reps.
2. Python overhead: the same call sequence on a tiny model (8 wide, 2 tokens), where the ops
   do almost nothing: what the Python between and around the kernels costs a micro-batch.
3. GIL waits: 1 and then 2 threads each running --reps micro-batches on their own buffers (no
   reducer); a thread's wall time minus its CPU time is time it slept, waiting for the GIL.
"""

import argparse
import json
import threading
import time

import numpy as np

from crystal.backends.cpu import CpuBackend, blas_threads
from crystal.backends.timing import TimedBackend
from crystal.config import ModelConfig, resolve
from crystal.model import Activations, ParamLayout, Tensors, backward, forward, init_params, warm_up


class MicroBatch:
    """Parameters, gradients, activations and a batch of one config, ready to run."""

    def __init__(self, be, cfg: ModelConfig, B: int, T: int):
        self.be, self.cfg = be, cfg
        layout = ParamLayout(cfg)
        self.w = Tensors(layout, init_params(cfg, 0), be)  # a llama's rotary table on the backend
        self.g = Tensors(layout, np.empty(layout.size, np.float32))
        self.a = Activations(be, cfg, B, T)
        rng = np.random.default_rng(0)
        self.idx, self.tgt = (rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32) for _ in range(2))

    def run(self, n: int, be=None) -> None:
        be = be or self.be
        for _ in range(n):
            forward(be, self.cfg, self.w, self.a, self.idx, self.tgt, grad=True)
            backward(be, self.cfg, self.w, self.g, self.a, self.idx, self.tgt)


def per_family(be, cfg, B, T, reps) -> dict:
    mb = MicroBatch(be, cfg, B, T)
    mb.run(10)
    timed = TimedBackend(be)
    mb.run(reps, timed)
    return {k: round(v / reps * 1e3, 4) for k, v in sorted(timed.breakdown().items(), key=lambda kv: -kv[1])}


def overhead_ms(be, cfg, reps) -> float:
    llama = dict(arch="llama", n_kv_head=cfg.n_kv_head, head_dim=2, intermediate_size=8,
                 tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias) if cfg.llama else {}
    tiny = ModelConfig(vocab_size=8, block_size=4, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=8, **llama)
    mb = MicroBatch(be, tiny, 1, 2)
    mb.run(10)
    t = time.perf_counter()
    mb.run(reps * 10)
    return (time.perf_counter() - t) / (reps * 10) * 1e3


def threads_ms(be, cfg, B, T, reps, n_threads) -> list[dict]:
    out = [None] * n_threads

    def work(i):
        mb = MicroBatch(be, cfg, B, T)
        with blas_threads(1):
            mb.run(5)
            wall, cpu = time.perf_counter(), time.thread_time()
            mb.run(reps)
            out[i] = {"wall_ms": round((time.perf_counter() - wall) / reps * 1e3, 3),
                      "cpu_ms": round((time.thread_time() - cpu) / reps * 1e3, 3)}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg, train = resolve(args.preset)
    B, T = train.batch_size, train.seq_len
    be = CpuBackend()
    warm_up(be, cfg)  # a llama's ops too
    with blas_threads(1):
        fam = per_family(be, cfg, B, T, args.reps)
        over = overhead_ms(be, cfg, args.reps)
    print(f"one micro-batch ({B} x {T} tokens, {args.preset}), one thread, ms per op family:")
    for k, v in fam.items():
        print(f"  {k:<10} {v:7.3f}")
    print(f"  {'total':<10} {sum(fam.values()):7.3f}")
    print(f"Python overhead (same calls, tiny model): {over:.3f} ms a micro-batch")
    rows = {n: threads_ms(be, cfg, B, T, args.reps, n) for n in (1, 2)}
    for n, r in rows.items():
        waits = ", ".join(f"wall {x['wall_ms']:.3f} / cpu {x['cpu_ms']:.3f}" for x in r)
        print(f"{n} thread(s), ms a micro-batch per thread: {waits}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "families_ms": fam,
                       "overhead_ms": round(over, 4), "threads": rows}, f, indent=2)


if __name__ == "__main__":
    main()
