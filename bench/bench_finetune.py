"""A GPT-2 124M-shaped fine-tuning step on the CPU: crystal against transformers'
GPT2LMHeadModel, same batch, threads, AdamW and clipping, alternating in one script.

Usage (from the repository root, with the test extra installed):
    python bench/bench_finetune.py [--threads 2] [--steps 4] [--warmup-steps 1] [--rounds 2]
                                   [--micro-batches 8] [--seq-len 256] [--json OUT]

Both sides start from the same parameters (crystal's GPT-2 init, vocabulary 50257, T_max 1024)
and train on the same random token batches: M micro-batches of 1 x T tokens a step. crystal
runs `--threads` sphere threads with one BLAS thread each; transformers runs one process with
torch.set_num_threads(--threads) and does the step's M sequences in one forward/backward (its
fastest way), loss = mean cross-entropy, AdamW (betas 0.9/0.95, weight decay 0.1 on 2-D tensors),
clipping at 1.0. Each side is a fresh subprocess (its own peak RSS); the first --warmup-steps
steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = r'''
import json, os, resource, sys, time
import numpy as np
threads, steps, warmup, M, T = (int(a) for a in sys.argv[2:7])
V = 50257
from crystal.config import resolve
m, c = resolve("gpt2", dict(vocab_size=V), dict(batch_size=1, seq_len=T, micro_batches=M, spheres=threads,
                                                steps=steps, warmup=1, eval_every=0, device="cpu", lr=3e-5))
rng = np.random.default_rng(0)
tokens = rng.integers(0, V, 400_000).astype(np.uint16)
def report(marks):
    timed = marks[warmup:]
    tps = M * T * (len(timed) - 1) / (timed[-1] - timed[0])
    print(json.dumps({"tokens_per_s": tps, "ms_per_step": 1e3 * (timed[-1] - timed[0]) / (len(timed) - 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

CRYSTAL = COMMON + r'''
from crystal.backends.cpu import CpuBackend
from crystal.data import DataSet
from crystal.trainer import train
ds = DataSet(tokens, tokens[:20_000], None, V, "random tokens", 20_000)
marks = []
train(m, c, dataset=ds, backend=CpuBackend(), on_step=lambda rec, s: marks.append(time.perf_counter()))
report(marks)
'''

TRANSFORMERS = COMMON + r'''
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from crystal.data import BatchIterator
from crystal.model import ParamLayout, init_params
torch.set_num_threads(threads)
cfg = GPT2Config(vocab_size=V, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 tie_word_embeddings=True)
model = GPT2LMHeadModel(cfg)
state = {k: torch.tensor(v.copy()) for k, v in ParamLayout(m).views(init_params(m, c.seed)).items()}
model.load_state_dict(state, strict=False)
model.tie_weights()
decay = [p for n, p in model.named_parameters() if p.dim() == 2]
rest = [p for n, p in model.named_parameters() if p.dim() != 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                        lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)
it = BatchIterator(tokens, 1, T, c.seed, V)
marks = []
for _ in range(steps):
    batch = [it.next_batch() for _ in range(M)]
    x = torch.tensor(np.concatenate([b[0] for b in batch]), dtype=torch.long)
    y = torch.tensor(np.concatenate([b[1] for b in batch]), dtype=torch.long)
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
report(marks)
'''


def run(side: str, args) -> dict:
    code = CRYSTAL if side == "crystal" else TRANSFORMERS
    out = subprocess.run([sys.executable, "-c", code, side, str(args.threads), str(args.steps),
                          str(args.warmup_steps), str(args.micro_batches), str(args.seq_len)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rounds = []
    for r in range(args.rounds):
        row = {side: run(side, args) for side in ("crystal", "transformers")}
        row["ratio"] = round(row["crystal"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 3)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    best = max(r["crystal"]["tokens_per_s"] for r in rounds) / max(r["transformers"]["tokens_per_s"] for r in rounds)
    out = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "micro_batches": args.micro_batches,
           "seq_len": args.seq_len, "steps": args.steps, "rounds": rounds, "best_ratio": round(best, 3)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
