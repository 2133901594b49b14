"""Generation on the CPU, GPT-2 124M shapes (or SmolLM2-135M's, --arch llama): crystal's KV-cache
decoder against transformers' `generate` with its cache, in one process, alternating, the same
threads and weights.

Usage (from the repository root, with the test extra installed):
    python bench/bench_generate.py [--arch gpt2|llama] [--threads 2] [--prompt-len 512]
                                   [--new-tokens 256] [--batches 1,8] [--rounds 2]
                                   [--full-window-tokens 2] [--blas-threads-check]
                                   [--shared-prefill 8] [--json OUT]

Shapes: --arch gpt2 (default): GPT-2 124M (vocabulary 50257, 12 x 768, 12 heads, T_max 1024),
against GPT2LMHeadModel; --arch llama: SmolLM2-135M (vocabulary 49152, 30 x 576, 9 heads on 3 KV
heads, SwiGLU 1536, rope_theta 1e5, tied head; T_max 1024 here), against LlamaForCausalLM. Both
sides run crystal's init (crystal.model.init_params) loaded into the transformers model by name.

crystal as `crystal sample` runs it: prefill at --threads BLAS threads, decode steps at
crystal.backends.cpu_infer.DECODE_BLAS_THREADS (1). Both sides run the same random prompts of
--prompt-len tokens, greedy, --new-tokens new tokens per sequence (no end-of-text). Time to first
token: the prefill and the first token (transformers: in the same generate call, when its
streamer receives the first new token). Decode tokens/s: batch x (new tokens - 1) / (the whole
time - time to first token). torch and NumPy's BLAS both limited to --threads. Each row records
the load average before it (a shared machine). --full-window-tokens: the old path (every token
recomputes a [1, block_size] window), for the record.
--blas-threads-check: crystal at batch 1, prefill and decode both at 1 BLAS thread, then both at
--threads, twice, alternating.
--shared-prefill N: the prefill of N samples of one prompt (`crystal sample --num-samples N`,
`n` choices of `crystal serve`), alternating: shared (computed in one row, its cache copied into
the other N - 1: Decoder.prefill today) against the N rows computed as one batch (the prefill
before sharing), --rounds times; both give the same logits.

--device cuda (bench/device_check.sh): crystal alone (kernels/kv_cache.cu), once per precision of
--precisions (fp32, bf16: bf16 weights, activations and cache) and per --graphs mode (off: eager
decode steps, on: replayed as CUDA graphs, crystal/decode_graphs.py; both on a backend made for
graphs, so the products are cuBLASLt's either way; each run is a new Decoder, so its first step
eager and its capture count in its decode time, as in one `crystal sample`), alternating; no
transformers and no full window; the same timing rules (each step's logits come back to the
host, so every step ends synchronized). One JSON line per row, tagged {"bench": "generate", ...}.
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
LLAMA_135M = dict(arch="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                  intermediate_size=1536, rope_theta=100000.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)


def model_config(args):
    """GPT-2 124M's shape (its sizes overridable for a quick look) or SmolLM2-135M's."""
    from crystal.config import ModelConfig

    if args.arch == "llama":
        return ModelConfig(block_size=1024, **LLAMA_135M)
    return ModelConfig(vocab_size=args.vocab, block_size=1024, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)


def transformers_model(cfg, flat):
    """GPT2LMHeadModel or LlamaForCausalLM of crystal's config (ModelConfig.to_hf), holding flat's
    values (crystal's tensor names are the Hugging Face ones; a tied head is the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from crystal.model import ParamLayout

    hf_cfg = (LlamaConfig if cfg.llama else GPT2Config).from_dict(cfg.to_hf())
    hf = AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, _ = hf.load_state_dict({k: torch.tensor(v.copy()) for k, v in ParamLayout(cfg).views(flat).items()},
                                    strict=False)
    hf.tie_weights()
    if any(not k.endswith(("lm_head.weight", "attn.bias", "attn.masked_bias")) for k in missing):
        raise SystemExit(f"tensors not loaded into the transformers model: {missing}")
    return hf


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
    """One generate call; the time to first token is when its streamer receives the first new
    token (its first put is the prompt)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self):
            pass

    x, first = torch.tensor(prompts), FirstToken()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(x), streamer=first)
        total = time.perf_counter() - t0
    return first.at - t0, total, out[:, x.shape[1]:].numpy()


def shared_prefill_run(model, prompt, n, shared: bool):
    """Seconds of the prefill of n samples of one prompt, and its logits: shared (Decoder.prefill:
    one row computed, its cache copied into the others) or the n rows as one batch forward (the
    prefill before sharing, through the decoder's own forward)."""
    from crystal.generate import Decoder

    dec = Decoder(model, n, len(prompt) + 1)
    t0 = time.perf_counter()
    if shared:
        logits = dec.prefill([prompt] * n)
    else:
        logits = dec._run(dec.cache, np.array([prompt] * n), np.zeros(n), np.full(n, len(prompt) - 1))
    return time.perf_counter() - t0, logits


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

    result = {"bench": "generate", "device": "cuda", "arch": cfg.arch, "date": time.strftime("%Y-%m-%d"),
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
                    row = {"arch": cfg.arch, "precision": precision, "graphs": graphs, "batch": B, "round": r,
                           **rates(B, args.new_tokens, ttft, total)}
                    if graphs and False in tokens:  # replayed steps: the eager steps' bits, so its tokens
                        row["same_tokens_as_eager"] = bool(np.array_equal(tokens[True], tokens[False]))
                    result["rows"].append(row)
                    print(json.dumps({"bench": "generate", **row}), flush=True)
        del model
    return result


def load() -> float:
    return round(os.getloadavg()[0], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2",
                    help="gpt2: GPT-2 124M's shapes; llama: SmolLM2-135M's")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16", help="--device cuda: the backends to decode on")
    ap.add_argument("--graphs", default="off,on", help="--device cuda: decode steps eager (off) and/or as CUDA graphs (on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8", help="'' for none")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full-window-tokens", type=int, default=2)
    ap.add_argument("--blas-threads-check", action="store_true")
    ap.add_argument("--shared-prefill", type=int, default=0, metavar="N",
                    help="time the prefill of N samples of one prompt, shared vs N rows (0: not)")
    ap.add_argument("--n-layer", type=int, default=12, help="gpt2: smaller models for a quick look (124M: 12)")
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from crystal.model import init_params

    cfg = model_config(args)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.device == "cuda":
        result = cuda_main(args, cfg, init_params(cfg, 0), np.random.default_rng(0))
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return

    import torch
    from threadpoolctl import threadpool_limits

    from crystal.backends import cpu_infer
    from crystal.backends.cpu import blas_threads
    from crystal.model import GPT

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    flat = init_params(cfg, 0)
    model = GPT(cfg, flat)
    rng = np.random.default_rng(0)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "arch": cfg.arch,
              "threads": args.threads, "cpus": os.cpu_count(), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab": cfg.vocab_size,
              "torch": torch.__version__, "load_start": load(), "batches": {}}
    crystal_run(model, [[1, 2, 3]], 3)  # compile the kernels
    hf = transformers_model(cfg, flat) if batches else None
    if hf is not None:
        transformers_run(hf, [[1, 2, 3]], 2)  # its first call's one-time costs
    for B in batches:
        prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
        rows = []
        for r in range(args.rounds):  # alternating, the first side alternating too
            row = {"round": r, "load": load()}
            for side in (("crystal", "transformers") if r % 2 == 0 else ("transformers", "crystal")):
                if side == "crystal":
                    ttft, total, c_ids = crystal_run(model, prompts, args.new_tokens)
                else:
                    ttft, total, h_ids = transformers_run(hf, prompts, args.new_tokens)
                row[side] = rates(B, args.new_tokens, ttft, total)
            row["same_tokens"] = bool(np.array_equal(c_ids, h_ids))
            row["decode_ratio"] = round(row["crystal"]["decode_tok_per_s"] / row["transformers"]["decode_tok_per_s"], 3)
            row["ttft_ratio"] = round(row["transformers"]["ttft_s"] / row["crystal"]["ttft_s"], 3)
            rows.append(row)
            print(json.dumps({"batch": B, **row}), flush=True)
        result["batches"][B] = rows
    if args.shared_prefill:
        n, prompt = args.shared_prefill, rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
        shared_prefill_run(model, prompt[:8], n, True)  # the workspaces' first use
        rows = []
        for r in range(args.rounds):
            row, logits = {"round": r, "load": load()}, {}
            for shared in ((True, False) if r % 2 == 0 else (False, True)):
                secs, logits[shared] = shared_prefill_run(model, prompt, n, shared)
                row["shared_s" if shared else "rows_s"] = round(secs, 4)
            row["speedup"] = round(row["rows_s"] / max(row["shared_s"], 1e-4), 2)
            row["max_abs_diff"] = float(np.abs(logits[True] - logits[False]).max())
            rows.append(row)
            print(json.dumps({"shared_prefill": n, **row}), flush=True)
        result["shared_prefill"] = {"n": n, "rows": rows}
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
        print(json.dumps({"full_window_s_per_token": s, "load": load()}), flush=True)
    result["load_end"] = load()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
