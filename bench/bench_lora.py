"""LoRA against the full fine-tune on the CPU, GPT-2 124M shapes: crystal LoRA (r 8, alpha 16,
dropout 0.05 on litgpt's / PEFT's GPT-2 target c_attn), crystal's full fine-tune, and
transformers + PEFT with the same adapters, alternating in one script.

Usage (from the repository root, with the test extra installed):
    python bench/bench_lora.py [--threads 2] [--steps 4] [--warmup-steps 1] [--rounds 1]
                               [--micro-batches 8] [--seq-len 256] [--n-layer 12] [--n-embd 768]
                               [--targets c_attn] [--sides lora,full,peft] [--json OUT]

Every side starts from the same parameters (crystal's GPT-2 init, vocabulary 50257, T_max
1024) and trains on the same random token batches: M micro-batches of 1 x T tokens a step,
AdamW, no clipping for LoRA (the finetune-lora preset), clipping 1.0 for the full fine-tune (the
gpt2 preset). crystal runs `--threads` sphere threads with one BLAS thread each; transformers +
PEFT one process with torch.set_num_threads(--threads), the step's M sequences in one
forward/backward. Each side is a fresh subprocess (its own peak RSS); the first --warmup-steps
steps are not timed. crystal's sides also report the bytes of what the trainable parameters
cost beyond the model: the reducer's gradient pool and the two AdamW moments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = r'''
import json, os, resource, sys, time
import numpy as np
threads, steps, warmup, M, T, L, C = (int(a) for a in sys.argv[2:9])
targets = sys.argv[9]
V = 50257
from crystal.config import resolve
lora_over = dict(lora_r=8, lora_targets=targets, init_from="random-base")
preset = "gpt2" if sys.argv[1] == "full" else "finetune-lora"
m, c = resolve(preset, dict(vocab_size=V, n_layer=L, n_embd=C, n_head=C // 64),
               dict(batch_size=1, seq_len=T, micro_batches=M, spheres=threads, steps=steps, warmup=1, eval_every=0,
                    device="cpu", lr=1e-3, epochs=None, **({} if sys.argv[1] == "full" else lora_over)))
rng = np.random.default_rng(0)
tokens = rng.integers(0, V, 400_000).astype(np.uint16)
extra = {}
def report(marks):
    timed = marks[warmup:]
    tps = M * T * (len(timed) - 1) / (timed[-1] - timed[0])
    print(json.dumps({"tokens_per_s": tps, "ms_per_step": 1e3 * (timed[-1] - timed[0]) / (len(timed) - 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
'''

CRYSTAL = COMMON + r'''
from crystal.backends.cpu import CpuBackend
from crystal.data import DataSet
from crystal.model import init_params
from crystal.trainer import train
ds = DataSet(tokens, tokens[:20_000], None, V, "random tokens", 20_000)
marks = []
def on_start(info):
    extra.update(params=info["params"], trainable=info["trainable"], adamw_moment_bytes=2 * 4 * info["trainable"])
def on_step(rec, spheres):
    marks.append(time.perf_counter())
    extra["grad_pool_bytes"] = int(spheres.reducer.pool.nbytes)
train(m, c, dataset=ds, backend=CpuBackend(), init=init_params(m, 0), on_start=on_start, on_step=on_step)
report(marks)
'''

PEFT = COMMON + r'''
import torch
import torch.nn.functional as F
import peft
from transformers import GPT2Config, GPT2LMHeadModel
from crystal.data import BatchIterator
from crystal.model import ParamLayout, init_params
torch.set_num_threads(threads)
cfg = GPT2Config(vocab_size=V, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 tie_word_embeddings=True)
model = GPT2LMHeadModel(cfg)
state = {k: torch.tensor(v.copy()) for k, v in ParamLayout(m).views(init_params(m, 0)).items()}
model.load_state_dict(state, strict=False)
model.tie_weights()
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                   target_modules=targets.split(","), fan_in_fan_out=True))
trainable = [p for p in model.parameters() if p.requires_grad]
extra.update(trainable=sum(p.numel() for p in trainable))
opt = torch.optim.AdamW(trainable, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay)
it = BatchIterator(tokens, 1, T, c.seed, V)
marks = []
model.train()
for _ in range(steps):
    batch = [it.next_batch() for _ in range(M)]
    x = torch.tensor(np.concatenate([b[0] for b in batch]), dtype=torch.long)
    y = torch.tensor(np.concatenate([b[1] for b in batch]), dtype=torch.long)
    logits = model(input_ids=x).logits
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
report(marks)
'''


def run(side: str, args) -> dict:
    code = PEFT if side == "peft" else CRYSTAL
    out = subprocess.run([sys.executable, "-c", code, side, str(args.threads), str(args.steps), str(args.warmup_steps),
                          str(args.micro_batches), str(args.seq_len), str(args.n_layer), str(args.n_embd),
                          args.targets], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--targets", default="c_attn")
    ap.add_argument("--sides", default="lora,full,peft")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sides = args.sides.split(",")
    rounds = []
    for _ in range(args.rounds):
        row = {side: run(side, args) for side in sides}
        if "lora" in row and "full" in row:
            row["lora_vs_full_tokens"] = round(row["lora"]["tokens_per_s"] / row["full"]["tokens_per_s"], 3)
            row["lora_vs_full_rss"] = round(row["lora"]["peak_rss_mb"] / row["full"]["peak_rss_mb"], 3)
        if "lora" in row and "peft" in row:
            row["lora_vs_peft_tokens"] = round(row["lora"]["tokens_per_s"] / row["peft"]["tokens_per_s"], 3)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "bench/bench_lora.py", *sys.argv[1:]]),
           "threads": args.threads, "micro_batches": args.micro_batches, "seq_len": args.seq_len,
           "n_layer": args.n_layer, "n_embd": args.n_embd, "targets": args.targets, "steps": args.steps,
           "load_average": os.getloadavg(), "rounds": rounds}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
