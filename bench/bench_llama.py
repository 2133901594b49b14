"""crystal (cpu backend) vs transformers' LlamaForCausalLM on PyTorch CPU: a Llama training step's
tokens/s and peak RSS, side by side, alternating.

Usage (from the repository root, with the test extra installed):
    python bench/bench_llama.py --preset llama-small [--spheres 2] [--threads 2] [--steps 30]
    python bench/bench_llama.py --preset smollm2-135m --seq-len 256 --batch 4 --crystal-batch 2 \\
                                [--layers N] [--steps 5 --warmup-steps 1] [--rounds 3] [--json OUT]

Both sides train the same Llama config from the same initial parameters (crystal's init_params,
copied into the transformers model by Hugging Face name) on the same batches (crystal's
BatchIterator), with AdamW (weight decay on 2-D tensors only), the same schedule and gradient
clipping, in float32, with the same total number of threads: crystal runs its real trainer
(crystal.trainer.train) with `--spheres` sphere threads of one BLAS thread each; transformers
runs one process with torch.set_num_threads(--threads) and does the whole step's batch in one
forward/backward of LlamaForCausalLM (attn_implementation "sdpa", use_cache off, the loss as
F.cross_entropy of the logits: its fastest eager way). Each measurement is a fresh subprocess (so
each side's peak RSS is its own; `import_rss_mb` is the RSS after imports, before any model), the
two sides alternate for --rounds rounds (the order flips every round), and the first
--warmup-steps steps of each are not timed.

Data. llama-small: the embedded corpus (bytes, vocabulary 256), the preset's step (12 micro-batches
of 1 x 64). Any other llama preset: the preset's released vocabulary (SmolLM2: 49,152) over
synthetic token ids (uniform, seeded; a step's cost does not depend on the ids), with the step's
shape from --seq-len, --batch (sequences a step) and --crystal-batch (sequences a crystal
micro-batch: micro-batches = batch / crystal-batch); --layers N keeps the first N blocks (a
2-core machine cannot time 30 layers of SmolLM2-135M many times over).

Model FLOPs per token: crystal.model.flops_per_token (6 x parameters in products + attention,
the PaLM convention). The sgemm peak is NumPy's float32 matmul of large matrices with --threads
threads, measured by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

SIDES = ("crystal", "transformers")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_configs(args):
    """(model config, train config) of the benchmark: the preset with the step's shape."""
    from crystal.config import resolve

    train = dict(spheres=args.spheres, steps=args.steps, device="cpu", eval_every=0, dropout=0.0)
    model = {}
    if args.preset != "llama-small":
        if args.batch % args.crystal_batch:
            sys.exit(f"--crystal-batch {args.crystal_batch} does not divide --batch {args.batch}")
        train.update(seq_len=args.seq_len, batch_size=args.crystal_batch, micro_batches=args.batch // args.crystal_batch)
        if args.layers:
            model.update(n_layer=args.layers)
    elif args.crystal_batch is not None:  # llama-small: the preset's 12 x 1 x 64, or the same 12 sequences cut otherwise
        _, cfg = resolve(args.preset)
        seqs = cfg.batch_size * cfg.micro_batches
        if seqs % args.crystal_batch:
            sys.exit(f"--crystal-batch {args.crystal_batch} does not divide the step's {seqs} sequences")
        train.update(batch_size=args.crystal_batch, micro_batches=seqs // args.crystal_batch)
    model_cfg, cfg = resolve(args.preset, model_overrides=model, train_overrides=train)
    if not model_cfg.llama:
        sys.exit(f"--preset {args.preset} is not a llama preset")
    return model_cfg, cfg


def dataset(model_cfg, cfg):
    """The embedded corpus (llama-small), or synthetic ids at the model's vocabulary."""
    import numpy as np

    from crystal.data import DataSet, load_dataset

    if cfg.preset == "llama-small":
        return load_dataset(None, cfg.val_fraction)
    n = max(1 << 20, 8 * cfg.tokens_per_step * (cfg.steps + 1))
    ids = np.random.default_rng(1234).integers(0, model_cfg.vocab_size, n).astype(np.int32)
    return DataSet(ids, ids[:0], None, model_cfg.vocab_size, "synthetic", None, "synthetic")


def mark() -> tuple[float, float]:
    """(wall, this process's CPU time: every thread's user + system) now."""
    return time.perf_counter(), time.process_time()


def rates(marks: list[tuple[float, float]], warmup: int, tokens_per_step: int) -> dict:
    """tokens per wall second and per CPU second over the steps after the warmup. On a shared
    machine the wall rate moves with the load; the CPU rate moves less (it still pays for cache
    and memory-bandwidth contention, and counts threads' spin-waits as work)."""
    timed = marks[warmup:]
    if len(timed) < 2:
        sys.exit(f"--steps must exceed --warmup-steps + 1 (got {len(marks)} steps)")
    tokens = tokens_per_step * (len(timed) - 1)
    return {"tokens_per_s": tokens / (timed[-1][0] - timed[0][0]),
            "tokens_per_cpu_s": tokens / (timed[-1][1] - timed[0][1])}


def run_crystal(args) -> dict:
    from crystal.trainer import train

    model_cfg, cfg = bench_configs(args)
    ds = dataset(model_cfg, cfg)
    base = rss_mb()
    marks, losses = [], []

    def on_step(rec, spheres):
        marks.append(mark())
        losses.append(rec.loss)

    train(model_cfg, cfg, dataset=ds, on_step=on_step)
    return {**rates(marks, args.warmup_steps, cfg.tokens_per_step), "import_rss_mb": base,
            "first_loss": losses[0], "last_loss": losses[-1]}


def hf_llama(model_cfg, flat):
    """transformers' LlamaForCausalLM of model_cfg, fp32, SDPA attention, crystal's parameters."""
    import torch
    import transformers

    from crystal.config import llama_to_hf
    from crystal.model import ParamLayout

    d = llama_to_hf(model_cfg)
    d.update(use_cache=False)
    kind = transformers.Qwen2Config if d["model_type"] == "qwen2" else transformers.LlamaConfig
    hf_cfg = kind(**{k: v for k, v in d.items() if k not in ("model_type", "architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    model_cls = transformers.Qwen2ForCausalLM if d["model_type"] == "qwen2" else transformers.LlamaForCausalLM
    model = model_cls(hf_cfg)
    views = ParamLayout(model_cfg).views(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is embed_tokens (one parameter)
            p.copy_(torch.from_numpy(views[name]))
    return model.train()


def run_transformers(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401  (imported before the RSS baseline, as crystal's trainer is)

    from crystal.data import BatchIterator
    from crystal.model import init_params
    from crystal.optim import lr_at

    torch.set_num_threads(args.threads)
    model_cfg, cfg = bench_configs(args)
    ds = dataset(model_cfg, cfg)
    base = rss_mb()
    flat = init_params(model_cfg, cfg.seed)
    model = hf_llama(model_cfg, flat)
    del flat  # the model holds its own copy; the init buffer is not the transformers side's memory
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    it = BatchIterator(ds.train, cfg.batch_size, cfg.seq_len, cfg.seed, model_cfg.vocab_size)
    V = model_cfg.vocab_size
    marks, losses = [], []
    for step in range(cfg.steps):
        xs, ys = zip(*(it.next_batch() for _ in range(cfg.micro_batches)))
        x, y = torch.from_numpy(np.concatenate(xs)).long(), torch.from_numpy(np.concatenate(ys)).long()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del logits, loss
        marks.append(mark())
    return {**rates(marks, args.warmup_steps, cfg.tokens_per_step), "import_rss_mb": base,
            "first_loss": losses[0], "last_loss": losses[-1]}


def worker(args) -> None:
    """One measurement in this process; prints a JSON line with tokens/s and peak RSS."""
    out = run_crystal(args) if args.side == "crystal" else run_transformers(args)
    out["peak_rss_mb"] = rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def measure(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--preset", args.preset, "--spheres", str(args.spheres),
           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--layers", str(args.layers)]
    if args.crystal_batch is not None:
        cmd += ["--crystal-batch", str(args.crystal_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_avg_1m_at_start": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--spheres", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256, help="sequence length (presets other than llama-small)")
    ap.add_argument("--batch", type=int, default=4, help="sequences a step (presets other than llama-small)")
    ap.add_argument("--crystal-batch", type=int, default=None,
                    help="sequences a crystal micro-batch (llama-small: default the preset's 1; others: 1)")
    ap.add_argument("--layers", type=int, default=0, help="blocks kept (0: the preset's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=SIDES, dest="side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset != "llama-small" and args.crystal_batch is None:
        args.crystal_batch = 1
    if args.side:
        return worker(args)
    from bench_cpu import cpu_model, sgemm_peak

    from crystal.model import ParamLayout, flops_per_token

    model_cfg, cfg = bench_configs(args)
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    peak = sgemm_peak(args.threads)
    runs = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            runs[side].append(measure(side, args))
            x = runs[side][-1]
            print(f"round {r + 1} {side:>12}: {x['tokens_per_s']:>9,.1f} tok/s, {x['tokens_per_cpu_s']:>9,.1f} tok/cpu-s, peak RSS {x['peak_rss_mb']:,.0f} MB, "
                  f"loss {x['first_loss']:.4f} -> {x['last_loss']:.4f}", flush=True)
    c, t = (statistics.median(x["tokens_per_s"] for x in runs[s]) for s in SIDES)
    cc, tc = (statistics.median(x["tokens_per_cpu_s"] for x in runs[s]) for s in SIDES)
    rss = {s: statistics.median(x["peak_rss_mb"] for x in runs[s]) for s in SIDES}
    out = {
        "bench": "llama", "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {cpu_model()}", "load_avg_at_start": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
        "model": {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_kv_head": model_cfg.kv_heads,
                  "n_embd": model_cfg.n_embd, "intermediate_size": model_cfg.mlp_size, "vocab_size": model_cfg.vocab_size,
                  "params": ParamLayout(model_cfg).n_params, "tied": model_cfg.tied},
        "spheres": args.spheres, "threads": args.threads, "seq_len": cfg.seq_len,
        "crystal_micro_batch": [cfg.micro_batches, cfg.batch_size], "tokens_per_step": cfg.tokens_per_step,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "sgemm_peak_gflops": round(peak / 1e9, 1),
        "flops_per_token": fpt,
        # medians over the rounds (the machine is shared and noisy), and each round's ratio
        "crystal_tokens_per_s": round(c, 1), "transformers_tokens_per_s": round(t, 1), "median_ratio": round(c / t, 3),
        "round_ratios": [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(*runs.values())],
        "crystal_tokens_per_cpu_s": round(cc, 1), "transformers_tokens_per_cpu_s": round(tc, 1),
        "median_cpu_ratio": round(cc / tc, 3),
        "crystal_gflops": round(c * fpt / 1e9, 1), "transformers_gflops": round(t * fpt / 1e9, 1),
        "crystal_peak_rss_mb": round(rss["crystal"]), "transformers_peak_rss_mb": round(rss["transformers"]),
        "rss_ratio": round(rss["crystal"] / rss["transformers"], 3),
        "all_rounds": {s: [{k: round(v, 4) for k, v in x.items()} for x in xs] for s, xs in runs.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
