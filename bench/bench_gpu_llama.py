"""crystal (cuda backend) vs transformers' LlamaForCausalLM on the same GPU: a Llama training
step's tokens/s, MFU and peak memory, fp32 and bf16.

Usage (on a machine with an NVIDIA GPU, from the repository root):
    PYTHONPATH=. python3 bench/bench_gpu_llama.py [--preset smollm2-135m] [--precision fp32 bf16]
        [--seq-len 2048] [--batch-size 2] [--micro-batches 8] [--spheres 2] [--layers N]
        [--steps 8] [--warmup-steps 3] [--rounds 1] [--json OUT]
    python bench/bench_gpu_llama.py --cpu-check   # no GPU: both sides' setup and steps, tiny, on the cpu

Both sides train the same Llama (the preset's shape at its released vocabulary, over synthetic
token ids: a step's cost does not depend on them) from the same initial parameters (crystal's
init_params, copied into transformers' model by Hugging Face name), with the same batch shape
(M micro-batches of B x T tokens a step from crystal's BatchIterator, one forward/backward per
micro-batch), the same learning-rate schedule, AdamW (transformers
side: torch's fused AdamW, weight decay on 2-D tensors) and gradient clipping, in one process;
each round runs crystal, then transformers, and the best round of each counts. Dropout is off.

Precisions: fp32 (crystal: cuBLAS pedantic fp32; transformers: TF32 off, attn_implementation
"sdpa"), bf16 (crystal: --precision bf16, fp32 master weights, bf16 activations, cuBLASLt, cuDNN
flash attention with grouped-query heads when available; transformers: fp32 parameters under
torch.autocast("cuda", dtype=torch.bfloat16) with attn_implementation "sdpa", i.e. standard AMP).

MFU and memory as bench/bench_gpu.py measures them (crystal.model.flops_per_token over the GPU's
matmul peak at that precision; crystal: cupy's pool high-water and the device's used memory;
transformers: torch.cuda.max_memory_allocated / max_memory_reserved). The JSON file is rewritten
after every measurement ("complete": false until the end).

--cpu-check: no GPU needed. Runs a 2-layer, T=32 version of every side on the cpu (crystal's cpu
backend; transformers on the cpu, autocast to bf16 on the cpu for the bf16 row) for 3 steps, so the
script's setup (configs, data, parameter copy, optimizer, loss) is exercised before a GPU is lent.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from crystal.config import resolve  # noqa: E402
from crystal.memory import memory_estimate  # noqa: E402
from crystal.model import ParamLayout, flops_per_token, init_params  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def configs(args, precision: str):
    """(model, train) configs: the preset at its released vocabulary with the step's shape."""
    model = {"n_layer": args.layers} if args.layers else {}
    train = dict(seq_len=args.seq_len, batch_size=args.batch_size, micro_batches=args.micro_batches,
                 spheres=args.spheres, steps=args.steps, dropout=0.0, eval_every=0,
                 device="cpu" if args.cpu_check else "cuda", precision="fp32" if args.cpu_check else precision)
    model_cfg, cfg = resolve(args.preset, model_overrides=model, train_overrides=train)
    if not model_cfg.llama:
        sys.exit(f"--preset {args.preset} is not a llama preset")
    return model_cfg, cfg


def synthetic(model_cfg, cfg):
    from bench_llama import dataset

    return dataset(model_cfg, cfg)


# --- crystal -------------------------------------------------------------------------------------

def crystal_run(args, precision: str) -> dict:
    from crystal.trainer import train

    model_cfg, cfg = configs(args, precision)
    ds = synthetic(model_cfg, cfg)
    marks, peak = [], {"pool_total": 0, "pool_used": 0, "device_used": 0}
    if args.cpu_check:
        from crystal.backends import get_backend

        be, sample = get_backend("cpu"), (lambda: None)
    else:
        import cupy as cp

        from bench_gpu import crystal_backend

        be = crystal_backend(precision)
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()

        def sample():
            free, total = cp.cuda.runtime.memGetInfo()
            peak["pool_total"] = max(peak["pool_total"], pool.total_bytes())
            peak["pool_used"] = max(peak["pool_used"], pool.used_bytes())
            peak["device_used"] = max(peak["device_used"], total - free)

    def on_step(rec, spheres):
        marks.append(time.perf_counter())
        sample()

    t0 = time.perf_counter()
    result = train(model_cfg, cfg, dataset=ds, backend=be, on_step=on_step)
    timed = marks[args.warmup_steps:]
    out = {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
           "first_step_s": round(marks[0] - t0, 2), "flash": bool(getattr(be, "flash", False)),
           "pool_peak_bytes": peak["pool_total"], "pool_used_peak_bytes": peak["pool_used"],
           "device_used_peak_bytes": peak["device_used"],
           "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4)}
    del result, be
    gc.collect()
    if not args.cpu_check:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
    return out


# --- transformers --------------------------------------------------------------------------------

def transformers_run(args, precision: str) -> dict:
    import torch
    import torch.nn.functional as F

    from bench_llama import hf_llama
    from crystal.data import BatchIterator
    from crystal.optim import lr_at

    device = "cpu" if args.cpu_check else "cuda"
    cuda = device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32; bf16 is autocast's
    torch.backends.cudnn.allow_tf32 = False
    model_cfg, cfg = configs(args, precision)
    ds = synthetic(model_cfg, cfg)
    model = hf_llama(model_cfg, init_params(model_cfg, cfg.seed)).to(device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cuda)
    it = BatchIterator(ds.train, cfg.batch_size, cfg.seq_len, cfg.seed, model_cfg.vocab_size)  # crystal's batches
    V, bf16 = model_cfg.vocab_size, precision == "bf16"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    marks, losses = [], []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batches = [tuple(torch.from_numpy(a).long().to(device, non_blocking=True) for a in it.next_batch())
                   for _ in range(cfg.micro_batches)]
        total = 0.0
        for x, y in batches:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
            (loss / cfg.micro_batches).backward()
            total = total + loss.detach()
            del logits, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / cfg.micro_batches)
        sync()
        marks.append(time.perf_counter())
    timed = marks[args.warmup_steps:]
    out = {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
           "first_step_s": round(marks[0] - t0, 2),
           "max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
           "max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
           "loss_first": round(float(losses[0]), 4), "loss_last": round(float(losses[-1]), 4),
           "attn_implementation": model.config._attn_implementation}
    del model, opt, batches, decay, other, losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--spheres", type=int, default=2, help="crystal's sphere streams")
    ap.add_argument("--layers", type=int, default=0, help="blocks kept (0: the preset's)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-torch", action="store_true", help="crystal only")
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: a tiny version of every side on the cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cpu_check:
        args.layers, args.seq_len, args.batch_size, args.micro_batches = 2, 32, 2, 2
        args.steps, args.warmup_steps, args.rounds = 3, 1, 1
    if args.steps - args.warmup_steps < 2:
        ap.error("--steps must exceed --warmup-steps by at least 2")
    skipped = {}
    precisions = list(args.precision)
    if args.cpu_check:
        device = "cpu (--cpu-check)"
    else:
        import cupy as cp

        from bench_gpu import bf16_unavailable

        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        why = bf16_unavailable() if "bf16" in precisions else None
        if why:
            skipped["bf16"] = why
            precisions.remove("bf16")
            print(f"bf16 skipped: {why}")
    model_cfg, cfg = configs(args, "fp32")
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    out = {"bench": "gpu_llama", "device": device, "preset": args.preset, "spheres": cfg.spheres,
           "steps": args.steps, "warmup_steps": args.warmup_steps, "rounds": args.rounds,
           "batch_size": cfg.batch_size, "micro_batches": cfg.micro_batches, "seq_len": cfg.seq_len,
           "tokens_per_step": cfg.tokens_per_step,
           "model": {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_kv_head": model_cfg.kv_heads,
                     "n_embd": model_cfg.n_embd, "intermediate_size": model_cfg.mlp_size,
                     "vocab_size": model_cfg.vocab_size, "tied": model_cfg.tied},
           "parameters": ParamLayout(model_cfg).n_params, "flops_per_token": fpt,
           "data_note": "synthetic token ids at the preset's released vocabulary",
           "torch_adamw": "fused", "date": time.strftime("%Y-%m-%d"), "skipped": skipped, "rows": [],
           "complete": False}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    save()
    sides = ["crystal"] + ([] if args.no_torch else ["transformers"])
    gib = 2 ** 30
    for precision in precisions:
        row = {"precision": precision}
        out["rows"].append(row)
        peak = float("nan")
        if not args.cpu_check:
            from bench_gpu import matmul_peak

            try:
                peak, how = matmul_peak(precision)
            except Exception as e:
                how = _err(e)
            row["matmul_peak_tflops"], row["matmul_peak_by"] = round(peak / 1e12, 1), how
        runs = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides:
                if row.get(f"{side}_error"):
                    continue  # it failed once: do not spend the time again
                if args.cpu_check and side == "crystal" and precision == "bf16":
                    continue  # the cpu backend is fp32 only
                t0 = time.perf_counter()
                try:
                    res = crystal_run(args, precision) if side == "crystal" else transformers_run(args, precision)
                except Exception as e:
                    traceback.print_exc()
                    row[f"{side}_error"] = _err(e)
                    print(json.dumps({"precision": precision, "round": r, "side": side, "error": row[f"{side}_error"]}))
                    save()
                    continue
                res["wall_s"] = round(time.perf_counter() - t0, 1)
                runs[side].append(res)
                print(json.dumps({"bench": "gpu_llama", "precision": precision, "round": r, "side": side,
                                  **{k: (round(v) if isinstance(v, float) and v > 100 else v) for k, v in res.items()}}),
                      flush=True)
                for s, rs in runs.items():  # the best round of each side so far
                    if not rs:
                        continue
                    best = max(x["tokens_per_s"] for x in rs)
                    row[f"{s}_tokens_per_s"] = round(best)
                    row[f"{s}_mfu"] = round(best * fpt / peak, 4) if peak == peak else None
                    row[f"{s}_losses_first_last"] = [rs[-1]["loss_first"], rs[-1]["loss_last"]]
                    if s == "crystal":
                        row["crystal_flash"] = rs[-1]["flash"]
                        row["crystal_pool_peak_gib"] = round(max(x["pool_peak_bytes"] for x in rs) / gib, 3)
                        row["crystal_device_used_peak_gib"] = round(max(x["device_used_peak_bytes"] for x in rs) / gib, 3)
                        est = memory_estimate(model_cfg, cfg.micro_batches, cfg.spheres, cfg.batch_size, cfg.seq_len,
                                              1, precision, rs[-1]["flash"])
                        row["crystal_memory_estimate_gib"] = round(est["total"] / gib, 3)
                    else:
                        row["transformers_max_allocated_gib"] = round(max(x["max_allocated_bytes"] for x in rs) / gib, 3)
                        row["transformers_max_reserved_gib"] = round(max(x["max_reserved_bytes"] for x in rs) / gib, 3)
                c, t = row.get("crystal_tokens_per_s"), row.get("transformers_tokens_per_s")
                if c and t:
                    row["ratio"] = round(c / t, 3)
                save()
        print(json.dumps({"bench": "gpu_llama", **row}), flush=True)
    out["complete"] = True
    save()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
