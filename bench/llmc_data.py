"""Data files and the report for running llm.c's train_gpt2cu beside crystal (bench/bench_llmc.sh).

Usage (repository root, PYTHONPATH=.):
    python3 bench/llmc_data.py write [--out DIR] [--val-fraction 0.1]
    python3 bench/llmc_data.py check FILE... [--batch-size 16] [--seq-len 1024]
    python3 bench/llmc_data.py flops [--seq-len 1024]
    python3 bench/llmc_data.py summarize --log LOG [--warmup-steps 3] [--peak measure|spec|TFLOPS]
                                         [--binary PATH] [--variant NAME] [--command STR] [--json OUT]

write: crystal's embedded Tiny Shakespeare (crystal.data.default_corpus()) with crystal's own split
(load_dataset(None, f): the first 1 - f for training, the last f for validation) and crystal's
byte tokens (ids 0..255), as llm.c's token shards: dev/data/data_common.py write_datafile, i.e. a
header of 256 int32 (magic 20240520, version 1, token count) and then the tokens as uint16.
Files: DIR/tiny_shakespeare_train.bin, DIR/tiny_shakespeare_val.bin (llm.c's own names for its
Tiny Shakespeare shards). Every file is read back with `check` before `write` returns.
GPT-2's BPE tokenizer would need a download (no network on the GPU machine), so both sides see
the same byte tokens; llm.c's model still has GPT-2's 50257-token vocabulary (padded to 50304),
so its token embedding and LM head are 50304 x 768 against crystal's 256 x 768: 124.5M
parameters against 86.0M, and 1.37x the FLOPs per token (`flops` prints both). Token ids
above 255 are simply never seen; the speed does not depend on which ids arrive.

check: llm.c's DataLoader checks (llmc/dataloader.h dataloader_load_shard_ and dataloader_init),
re-implemented: magic, version, token count > 0, file size = 1024 + 2 x count, at least one
batch (count >= B x T + 1), and the number of B x T samples the loader will serve.

summarize: parses train_gpt2cu's output ("step N/M | loss .. | norm .. | lr .. | X ms |
Y% bf16 MFU | Z tok/s", "num_parameters: N", "| device | NAME |") and prints one JSON line:
tokens/s and ms/step (mean and median over the steps after --warmup-steps), llm.c's own last
tok/s (an EMA) and MFU printout (llm.c knows no H200 peak: it prints -100% there), and the MFU
of each side with its own parameter count, both in crystal's convention
(crystal.model.flops_per_token: 6 x (parameters - position embeddings) + 12 L T C, over the
GPU's bf16 matmul peak measured as bench/bench_gpu.py does: torch bf16 8192^3) and in llm.c's
(6 N + 6 L C T). crystal's tokens/s comes from bench_gpu.py; this file gives its FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c dev/data/data_common.py HEADERS_INFO["gpt-2"]
TRAIN_NAME, VAL_NAME = "tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"
# llm.c `-e d12`: GPT-2 124M from scratch (train_gpt2.cu gpt_build_from_descriptor)
LLMC_VOCAB, LLMC_PADDED_VOCAB = 50257, 50304
H200_SPEC_BF16_TFLOPS = 989.4  # dense bf16, H100/H200 SXM data sheet: only when nothing was measured


# --- llm.c's .bin token shards -------------------------------------------------------------------

def write_datafile(path: Path, tokens: np.ndarray) -> int:
    """llm.c dev/data/data_common.py write_datafile(filename, toks, "gpt-2"); returns bytes written."""
    toks = np.asarray(tokens)
    if toks.size == 0 or toks.size >= 2 ** 31:
        raise ValueError(f"{path}: token count {toks.size} out of range")
    if toks.min() < 0 or toks.max() >= 2 ** 16:
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, VERSION, toks.size
    data = toks.astype("<u2").tobytes()
    with open(path, "wb") as f:
        f.write(header.astype("<i4").tobytes())
        f.write(data)
    return HEADER_INTS * 4 + len(data)


def read_datafile(path: Path, batch_size: int = 1, seq_len: int = 1) -> dict:
    """What llm.c's DataLoader checks and sees in one shard (llmc/dataloader.h), or ValueError."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_INTS * 4:
        raise ValueError(f"{path}: shorter than the {HEADER_INTS}-int32 header")
    header = np.frombuffer(raw[:HEADER_INTS * 4], dtype="<i4")
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (llm.c: 'Bad magic in the data file')")
    if header[1] != VERSION:
        raise ValueError(f"{path}: bad version {header[1]}")
    ntok = int(header[2])
    if ntok <= 0:
        raise ValueError(f"{path}: token count {ntok}")
    if len(raw) != HEADER_INTS * 4 + ntok * 2:  # llm.c: "Error: file size is not as expected"
        raise ValueError(f"{path}: {len(raw)} bytes, expected {HEADER_INTS * 4 + ntok * 2} for {ntok} tokens")
    if ntok < batch_size * seq_len + 1:  # dataloader_init: assert(shard_ntok >= B*T + 1)
        raise ValueError(f"{path}: {ntok} tokens, fewer than one batch of {batch_size} x {seq_len} + 1")
    tokens = np.frombuffer(raw[HEADER_INTS * 4:], dtype="<u2")
    # dataloader_load_shard_: (ntok * 2 - 2) / (B * T * 2) samples of B x T (+1 target) tokens
    samples = (ntok * 2 - 2) // (batch_size * seq_len * 2)
    return {"file": str(path), "tokens": ntok, "bytes": len(raw), "max_id": int(tokens.max()),
            "min_id": int(tokens.min()), "samples": samples, "tokens_array": tokens}


def write_shards(out: Path, val_fraction: float = 0.1) -> dict:
    from crystal.data import load_dataset

    ds = load_dataset(None, val_fraction)  # the embedded corpus, crystal's byte tokens and split
    out.mkdir(parents=True, exist_ok=True)
    info = {"corpus": ds.name, "tokenizer": "crystal bytes (vocabulary 256)", "val_fraction": val_fraction,
            "files": []}
    for name, toks in ((TRAIN_NAME, ds.train), (VAL_NAME, ds.val)):
        path = out / name
        write_datafile(path, toks)
        back = read_datafile(path)
        if not np.array_equal(back.pop("tokens_array"), np.asarray(toks, dtype=np.uint16)):
            raise ValueError(f"{path}: tokens read back differ from those written")
        info["files"].append({k: back[k] for k in ("file", "tokens", "bytes", "min_id", "max_id")})
    return info


# --- FLOPs and parameters ------------------------------------------------------------------------

def llmc_num_parameters(n_layer: int = 12, n_embd: int = 768, block_size: int = 1024,
                        padded_vocab: int = LLMC_PADDED_VOCAB) -> int:
    """train_gpt2.cu fill_in_parameter_sizes for `-e dL`: what it prints as num_parameters."""
    C, L = n_embd, n_layer
    return padded_vocab * C + block_size * C + L * (12 * C * C + 13 * C) + 2 * C


def flops_table(seq_len: int = 1024, llmc_params: int | None = None) -> dict:
    from crystal.config import resolve
    from crystal.model import ParamLayout, flops_per_token

    cfg, _ = resolve("gpt2")
    L, C, T = cfg.n_layer, cfg.n_embd, seq_len
    n_llmc = llmc_params or llmc_num_parameters(L, C, cfg.block_size)
    crystal_n = ParamLayout(cfg).n_params
    attn = 12 * L * T * C
    wpe = cfg.block_size * C
    f_crystal = flops_per_token(cfg, T)
    f_llmc = 6 * (n_llmc - wpe) + attn  # the same convention with llm.c's parameters
    return {
        "seq_len": T,
        "crystal_gpt2_vocab": cfg.vocab_size,
        "crystal_gpt2_parameters": crystal_n,
        "crystal_flops_per_token": f_crystal,
        "llmc_vocab": LLMC_VOCAB, "llmc_padded_vocab": LLMC_PADDED_VOCAB,
        "llmc_parameters": n_llmc,
        "llmc_flops_per_token": f_llmc,
        "llmc_flops_per_token_llmc_formula": 6 * n_llmc + 6 * L * C * T,  # gpt2_estimate_mfu
        "llmc_over_crystal_flops": round(f_llmc / f_crystal, 4),
        "convention": "crystal.model.flops_per_token: 6 x (parameters - wpe) + 12 L T C",
    }


def measure_peak() -> tuple[float, str]:
    """bench_gpu.matmul_peak('bf16'): FLOP/s of torch bf16 8192^3 on this GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import matmul_peak

    return matmul_peak("bf16")


# --- train_gpt2cu's output -----------------------------------------------------------------------

STEP_RE = re.compile(r"^step\s+(\d+)/(\d+) \| loss (\S+) .*?\| ([0-9.]+) ms \| (-?[0-9.]+)% \w+ MFU \| "
                     r"(-?[0-9.]+) tok/s")


def parse_log(text: str) -> dict:
    steps = []
    for line in text.splitlines():
        m = STEP_RE.match(line.strip())
        if m:
            steps.append({"step": int(m[1]), "of": int(m[2]), "loss": float(m[3]), "ms": float(m[4]),
                          "mfu_pct": float(m[5]), "tok_s_ema": float(m[6])})

    def grab(pattern, cast=str):
        m = re.search(pattern, text, re.M)
        return cast(m[1].strip()) if m else None

    return {
        "steps": steps,
        "num_parameters": grab(r"^num_parameters: (\d+)", int),
        "device": grab(r"^\| device\s+\| (.*?)\s*\|$"),
        "peak_tflops_llmc": grab(r"^\| peak TFlops\s+\| (\S+)", float),
        "precision": grab(r"^\| precision\s+\| (\S+)"),
        "B": grab(r"^\| micro batch size B\s+\| (\d+)", int),
        "T": grab(r"^\| sequence length T\s+\| (\d+)", int),
        "total_batch": grab(r"^\| total batch size\s+\| (\d+)", int),
        "grad_accum": grab(r"=> setting grad_accum_steps=(\d+)", int),
        "recompute": grab(r"^\| recompute\s+\| (\d+)", int),
        "gelu_fusion": grab(r"^\| gelu_fusion\s+\| (\d+)", int),
        "avg_iteration_ms": grab(r"^total average iteration time: ([0-9.]+) ms", float),
    }


def summarize(args) -> dict:
    text = Path(args.log).read_text(errors="replace")
    p = parse_log(text)
    out = {"bench": "llmc", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "device": p["device"], "variant": args.variant, "binary": args.binary, "command": args.command,
           "train_rc": args.rc, "timed_out": args.rc in (124, 137) if args.rc is not None else None,
           "B": p["B"], "T": p["T"], "total_batch": p["total_batch"], "grad_accum_steps": p["grad_accum"],
           "precision": p["precision"], "recompute": p["recompute"], "gelu_fusion": p["gelu_fusion"]}
    steps = p["steps"]
    timed = [s for s in steps if s["step"] > args.warmup_steps]
    if not timed or not p["total_batch"]:
        out["error"] = (f"no timed steps in {args.log} ({len(steps)} step lines, "
                        f"{args.warmup_steps} warm-up): see the log")
        return out
    ms = [s["ms"] for s in timed]
    mean_ms, median_ms = statistics.fmean(ms), statistics.median(ms)
    tok_s = p["total_batch"] / (mean_ms / 1e3)
    out.update({
        "steps_run": len(steps), "steps_timed": len(timed), "warmup_steps": args.warmup_steps,
        "ms_per_step": round(mean_ms, 2), "ms_per_step_median": round(median_ms, 2),
        "ms_per_step_min": round(min(ms), 2), "ms_per_step_max": round(max(ms), 2),
        "tokens_per_s": round(tok_s), "tokens_per_s_median": round(p["total_batch"] / (median_ms / 1e3)),
        "llmc_tok_s_ema_last": steps[-1]["tok_s_ema"], "llmc_mfu_pct_last": steps[-1]["mfu_pct"],
        "llmc_peak_tflops": p["peak_tflops_llmc"], "llmc_avg_iteration_ms": p["avg_iteration_ms"],
        "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
        "losses_finite": all(math.isfinite(s["loss"]) for s in steps),
    })
    if p["peak_tflops_llmc"] is not None and p["peak_tflops_llmc"] < 0:
        out["llmc_mfu_note"] = "llm.c's GPU table (llmc/mfu.h) has no entry for this device: its MFU prints as -100%"
    fl = flops_table(p["T"] or 1024, p["num_parameters"])
    out["flops"] = fl
    peak, peak_what = None, None
    if args.peak == "measure":
        try:
            peak, peak_what = measure_peak()
        except BaseException as e:  # no torch / no GPU: fall back to the data sheet
            peak_what = f"measure failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:200]
    elif args.peak != "spec":
        peak, peak_what = float(args.peak) * 1e12, "given"
    if peak is None:
        peak = H200_SPEC_BF16_TFLOPS * 1e12
        peak_what = (peak_what + "; " if peak_what else "") + f"H100/H200 SXM data sheet {H200_SPEC_BF16_TFLOPS} TFLOP/s"
    out["peak_tflops"] = round(peak / 1e12, 1)
    out["peak_from"] = peak_what
    out["model_tflops_per_s"] = round(fl["llmc_flops_per_token"] * tok_s / 1e12, 1)
    out["mfu"] = round(fl["llmc_flops_per_token"] * tok_s / peak, 4)
    out["mfu_llmc_formula"] = round(fl["llmc_flops_per_token_llmc_formula"] * tok_s / peak, 4)
    # crystal's byte-vocabulary gpt2 does 1/llmc_over_crystal_flops of this work per token
    # the crystal (byte-vocabulary gpt2) tokens/s whose model FLOP/s equal llm.c's here
    out["crystal_tok_s_for_equal_model_flops"] = round(tok_s * fl["llmc_over_crystal_flops"])
    return out


# --- CLI -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", default="/tmp/llmc-data")
    w.add_argument("--val-fraction", type=float, default=0.1)
    c = sub.add_parser("check")
    c.add_argument("files", nargs="+")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--seq-len", type=int, default=1024)
    f = sub.add_parser("flops")
    f.add_argument("--seq-len", type=int, default=1024)
    s = sub.add_parser("summarize")
    s.add_argument("--log", required=True)
    s.add_argument("--warmup-steps", type=int, default=3)
    s.add_argument("--peak", default="measure", help="measure (torch bf16 8192^3), spec, or TFLOP/s")
    s.add_argument("--binary", default=None)
    s.add_argument("--variant", default=None)
    s.add_argument("--command", default=None)
    s.add_argument("--json", default=None)
    s.add_argument("--rc", type=int, default=None, help="train_gpt2cu's exit status (124/137: timed out)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "write":
            print(json.dumps(write_shards(Path(args.out), args.val_fraction)))
        elif args.cmd == "check":
            for path in args.files:
                info = read_datafile(Path(path), args.batch_size, args.seq_len)
                info.pop("tokens_array")
                print(json.dumps(info))
        elif args.cmd == "flops":
            print(json.dumps(flops_table(args.seq_len)))
        else:
            out = summarize(args)
            line = json.dumps(out)
            print(line)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            return 1 if "error" in out else 0
    except (OSError, ValueError) as e:
        print(f"llmc_data.py {args.cmd}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
