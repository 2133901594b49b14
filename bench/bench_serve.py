"""`crystal serve` under load: N concurrent streaming clients (the official openai client) on
127.0.0.1 against the same N requests sent one after another, on one server in this process.

Usage (from the repository root, with the test extra installed):
    python bench/bench_serve.py [--clients 16] [--new-tokens 64] [--prompt-len 64]
                                [--n-layer 4] [--n-embd 256] [--block-size 256] [--json OUT]

The model: a random GPT-2 of the given shape with the bytes vocabulary (256), saved by
transformers. Every request: a prompt of --prompt-len bytes, temperature 1 with its own seed,
--new-tokens new tokens (end-of-text off: a bytes tokenizer has none), streamed. Reported: the
total tokens/s (clients x new tokens / wall time) and the p50/p99 time to first token (the
first streamed chunk with text), concurrent and sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(client, model, prompt, seed, new_tokens) -> tuple[float, int]:
    """(time to first token, tokens) of one streamed request."""
    t0, first, n = time.perf_counter(), None, 0
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, seed=seed,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    return first if first is not None else time.perf_counter() - t0, n


def pct(xs, q) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args()

    import openai
    import torch
    import transformers

    from crystal.serve import Limits, ServedModel, Server
    from crystal.watch import bind

    tmp = Path(tempfile.mkdtemp()) / "bench-serve"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=a.block_size, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_embd // 64,
        bos_token_id=0, eos_token_id=0)).save_pretrained(tmp)
    server = Server(ServedModel(tmp), bind("127.0.0.1", 0), limits=Limits(max_batch=max(16, a.clients)))
    server.start()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    prompt = ("ROMEO: " * a.prompt_len)[:a.prompt_len]
    one(client, tmp.name, prompt, 0, 4)  # warm: numba's compilation

    t0 = time.perf_counter()
    seq = [one(client, tmp.name, prompt, i, a.new_tokens) for i in range(a.clients)]
    t_seq = time.perf_counter() - t0

    conc = [None] * a.clients
    threads = [threading.Thread(target=lambda i=i: conc.__setitem__(i, one(client, tmp.name, prompt, i, a.new_tokens)))
               for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_conc = time.perf_counter() - t0
    server.stop()

    def row(name, res, wall):
        ttft = [r[0] for r in res]
        tokens = sum(r[1] for r in res)
        return {"mode": name, "clients": a.clients, "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 4),
                "ttft_p99_s": round(pct(ttft, 0.99), 4)}

    rows = [row("sequential", seq, t_seq), row("concurrent", conc, t_conc)]
    out = {"shape": vars(a), "cores": os.cpu_count(), "peak_jobs_batched": server.worker.peak_jobs, "rows": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
