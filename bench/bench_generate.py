"""Generation on the CPU, GPT-2 124M shapes: crystal's KV-cache decoder against transformers'
`generate` with its cache, in one process, alternating, the same threads and weights.

Usage (from the repository root, with the test extra installed):
    python bench/bench_generate.py [--threads 2] [--prompt-len 512] [--new-tokens 256]
                                   [--batches 1,8] [--rounds 2] [--full-window-tokens 2]
                                   [--blas-threads-check] [--json OUT]

crystal as `crystal sample` runs it: prefill at --threads BLAS threads, decode steps at
crystal.backends.cpu_infer.DECODE_BLAS_THREADS (1). Both sides run the same parameters (crystal's GPT-2 init, vocabulary 50257, T_max 1024) on the
same random prompts of --prompt-len tokens, greedy, --new-tokens new tokens per sequence (no
end-of-text). Time to first token: the prefill and the first token (transformers: generate with
max_new_tokens=1). Decode tokens/s: batch x (new tokens - 1) / (the whole time - time to first
token). crystal: torch and NumPy's BLAS both limited to --threads. --full-window-tokens: the old
path (every token recomputes a [1, block_size] window), for the record.
--blas-threads-check: crystal at batch 1, prefill and decode both at 1 BLAS thread, then both at
--threads, twice, alternating.

--device cuda (bench/device_check.sh): crystal alone (kernels/kv_cache.cu), once per precision of
--precisions (fp32, bf16: bf16 weights, activations and cache) and per --graphs mode (off: eager
decode steps, on: replayed as CUDA graphs, crystal/decode_graphs.py; both on a backend made for
graphs, so the products are cuBLASLt's either way; each run is a new Decoder, so its first step
eager and its capture count in its decode time, as in one `crystal sample`), alternating; no transformers and no full
window; the same timing rules (each step's logits come back to the host, so every step ends
synchronized). One JSON line per row, tagged {"bench": "generate", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

V = 50257


def crystal_run(model, prompts, new_tokens, graphs=False):
    from crystal.generate import Decoder

    t0 = time.perf_counter()
    dec = Decoder(model, len(prompts), min(model.config.block_size, len(prompts[0]) + new_tokens), graphs)
    tok = dec.prefill(prompts).argmax(-1)
    ttft = time.perf_counter() - t0
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = dec.decode(tok).argmax(-1)
        out.append(tok)
    return ttft, time.perf_counter() - t0, np.stack(out, 1)


def transformers_run(hf, prompts, new_tokens):
    import torch

    x = torch.tensor(prompts)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(x))
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t0
    return ttft, total, out[:, x.shape[1]:].numpy()


def full_window_run(model, prompt, n):
    """The old `crystal sample`: each token from a full [1, block_size] forward."""
    T = model.config.block_size
    ids, window = list(prompt), np.zeros((1, T), dtype=np.int32)
    t0 = time.perf_counter()
    for _ in range(n):
        ctx = ids[-T:]
        window[0, :len(ctx)] = ctx
        ids.append(int(np.argmax(model.logits(window)[0, len(ctx) - 1])))
    return (time.perf_counter() - t0) / n


def rates(B, new_tokens, ttft, total):
    return {"ttft_s": round(ttft, 4), "decode_tok_per_s": round(B * (new_tokens - 1) / (total - ttft), 2)}


def gpu_name() -> str | None:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no GPU (the emulated backend in a check of this script)
        return None


def cuda_main(args, cfg, flat, rng) -> dict:
    """Decode tokens/s and time to first token on the GPU, per precision and batch."""
    from crystal.backends import get_backend
    from crystal.model import GPT

    result = {"bench": "generate", "device": "cuda", "date": time.strftime("%Y-%m-%d"),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "n_layer": cfg.n_layer,
              "n_embd": cfg.n_embd, "vocab": cfg.vocab_size, "rows": []}
    modes = [m == "on" for m in args.graphs.split(",")]
    for precision in args.precisions.split(","):
        try:  # graphs need a backend made for them (cuBLASLt products); both modes run on it
            be = get_backend("cuda", precision, graphs=any(modes))
        except Exception as e:
            print(json.dumps({"bench": "generate", "precision": precision, "error": str(e).splitlines()[0]}))
            continue
        result.setdefault("gpu", gpu_name())
        model = GPT(cfg, flat, be)
        for graphs in modes:
            crystal_run(model, [[1, 2, 3]], 4, graphs)  # compile the kernels (and capture)
        for B in (int(b) for b in args.batches.split(",")):
            prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
            for r in range(args.rounds):
                tokens = {}
                for graphs in modes:  # alternating
                    ttft, total, tokens[graphs] = crystal_run(model, prompts, args.new_tokens, graphs)
                    row = {"precision": precision, "graphs": graphs, "batch": B, "round": r,
                           **rates(B, args.new_tokens, ttft, total)}
                    if graphs and False in tokens:  # replayed steps: the eager steps' bits, so its tokens
                        row["same_tokens_as_eager"] = bool(np.array_equal(tokens[True], tokens[False]))
                    result["rows"].append(row)
                    print(json.dumps({"bench": "generate", **row}), flush=True)
        del model
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16", help="--device cuda: the backends to decode on")
    ap.add_argument("--graphs", default="off,on", help="--device cuda: decode steps eager (off) and/or as CUDA graphs (on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full-window-tokens", type=int, default=2)
    ap.add_argument("--blas-threads-check", action="store_true")
    ap.add_argument("--n-layer", type=int, default=12, help="smaller models for a quick look (124M: 12)")
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from crystal.config import ModelConfig
    from crystal.model import init_params

    cfg = ModelConfig(vocab_size=args.vocab, block_size=1024, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd)
    if args.device == "cuda":
        result = cuda_main(args, cfg, init_params(cfg, 0), np.random.default_rng(0))
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return

    import torch
    from threadpoolctl import threadpool_limits
    from transformers import GPT2Config, GPT2LMHeadModel

    from crystal.backends import cpu_infer
    from crystal.backends.cpu import blas_threads
    from crystal.model import GPT, ParamLayout

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    flat = init_params(cfg, 0)
    model = GPT(cfg, flat)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=1024, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head,
                                    activation_function="gelu_new", tie_word_embeddings=True)).eval()
    hf.load_state_dict({k: torch.tensor(v.copy()) for k, v in ParamLayout(cfg).views(flat).items()}, strict=False)
    hf.tie_weights()
    rng = np.random.default_rng(0)
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "n_layer": args.n_layer, "torch": torch.__version__, "batches": {}}
    crystal_run(model, [[1, 2, 3]], 3)  # compile the kernels
    for B in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
        rows = []
        for _ in range(args.rounds):  # alternating
            c_ttft, c_total, c_ids = crystal_run(model, prompts, args.new_tokens)
            h_ttft, h_total, h_ids = transformers_run(hf, prompts, args.new_tokens)
            row = {"crystal": rates(B, args.new_tokens, c_ttft, c_total),
                   "transformers": rates(B, args.new_tokens, h_ttft, h_total),
                   "same_tokens": bool(np.array_equal(c_ids, h_ids))}
            row["decode_ratio"] = round(row["crystal"]["decode_tok_per_s"] / row["transformers"]["decode_tok_per_s"], 3)
            rows.append(row)
            print(json.dumps({"batch": B, **row}), flush=True)
        result["batches"][B] = rows
    if args.blas_threads_check:
        prompts = rng.integers(0, cfg.vocab_size, (1, args.prompt_len)).tolist()
        check, decode_threads = {}, cpu_infer.DECODE_BLAS_THREADS
        for n in (1, args.threads, 1, args.threads):  # prefill and decode both at n BLAS threads
            cpu_infer.DECODE_BLAS_THREADS = n
            with blas_threads(n):
                ttft, total, _ = crystal_run(model, prompts, args.new_tokens)
            check.setdefault(n, []).append(rates(1, args.new_tokens, ttft, total))
        cpu_infer.DECODE_BLAS_THREADS = decode_threads
        result["blas_threads_batch1"] = check
        print(json.dumps({"blas_threads_batch1": check}), flush=True)
    if args.full_window_tokens:
        s = full_window_run(model, rng.integers(0, cfg.vocab_size, args.prompt_len).tolist(), args.full_window_tokens)
        result["full_window_s_per_token"] = round(s, 3)
        print(json.dumps({"full_window_s_per_token": s}), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
