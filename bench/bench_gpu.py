"""crystal (cuda backend) vs PyTorch on the same GPU: tokens/s, MFU and peak memory, fp32, tf32, bf16.

Usage (on a machine with an NVIDIA GPU, from the repository root):
    PYTHONPATH=. python3 bench/bench_gpu.py [--preset shakespeare-char] [--precision fp32 tf32 bf16]
                                            [--steps 30] [--warmup-steps 5] [--rounds 2]
                                            [--batch-size B --micro-batches M] [--spheres 4]
                                            [--torch-compile] [--no-cudnn] [--json OUT]

Both sides train the same GPT-2 config from the same initial parameters with the same batch
shape (M micro-batches of B x T tokens a step, one forward/backward per micro-batch), AdamW
(PyTorch: fused) and gradient clipping, in one process; each round runs crystal, then PyTorch
eager, then (with --torch-compile) the same PyTorch step under torch.compile, and the best
round of each counts. Dropout is off on both sides.

Precisions: fp32 (crystal: cuBLAS pedantic fp32; PyTorch: TF32 off), tf32 (TF32 products on
both sides), bf16 (crystal: --precision bf16, fp32 master weights, bf16 activations, cuBLASLt,
cuDNN flash attention when available; PyTorch: fp32 parameters under
torch.autocast("cuda", dtype=torch.bfloat16) with F.scaled_dot_product_attention(is_causal=True),
i.e. standard AMP). The fp32/tf32 PyTorch side computes attention explicitly (softmax of the
masked scores), as in the earlier rows of bench/RESULTS.md. Without --precision: every one
that applies here (bf16 needs compute capability 8.0+ and nvmath-python).

MFU: model FLOPs (crystal.model.flops_per_token: 6 x (parameters - position embeddings) +
12 L T C) over the GPU's matmul peak measured here at the same precision: cupy 8192^3 for
fp32/tf32, torch.matmul on bf16 8192^3 for bf16 (cupy has no bf16 product).

Memory: crystal's peak is the high-water of cupy's default memory pool (total_bytes, what the
pool holds from the device; used_bytes, what is handed out: sampled after every step) and of the
device's used memory (cudaMemGetInfo, sampled likewise: includes the CUDA contexts); PyTorch's is
torch.cuda.max_memory_allocated / max_memory_reserved. Each side frees its cache before the
other runs. crystal.memory.memory_estimate for the config is printed next to them.

The JSON file is rewritten after every measurement ("complete": false until the end), so a run
cut off by a timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystal.config import resolve  # noqa: E402
from crystal.memory import memory_estimate  # noqa: E402
from crystal.model import ParamLayout, flops_per_token, init_params  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16")
TORCH_DEVICE = "cuda"  # a dry run of the PyTorch side on a machine without a GPU sets "cpu"
# HF Conv1D weights ([in, out] in crystal's layout); the PyTorch side keeps them as nn.Linear
# weights ([out, in], leaves), so autocast casts each once per forward, as in nanoGPT
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# --- peaks ---------------------------------------------------------------------------------------

def matmul_peak(precision: str, n: int = 8192, reps: int = 10) -> tuple[float, str]:
    """FLOP/s of an n^3 product at this precision, and what measured it."""
    if precision == "bf16":
        import torch

        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            c = a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del a, b, c
        torch.cuda.empty_cache()
        return 2 * n ** 3 * reps / dt, f"torch.matmul bf16 {n}^3"
    import cupy as cp

    from crystal.backends.cuda import set_matmul_precision

    set_matmul_precision(precision)
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), dtype=cp.float32)
    for _ in range(2):
        cp.matmul(a, b, out=c)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        cp.matmul(a, b, out=c)
    cp.cuda.Device().synchronize()
    dt = time.perf_counter() - t0
    del a, b, c
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * n ** 3 * reps / dt, f"cupy.matmul {precision} {n}^3"


def bf16_unavailable() -> str | None:
    """Why crystal cannot run --precision bf16 here, or None."""
    try:
        from crystal.backends.cuda import CudaBackend

        CudaBackend("bf16")
        return None
    except Exception as e:  # CrystalError (old GPU, no nvmath) or a broken install
        return _err(e)


# --- crystal -------------------------------------------------------------------------------------

def crystal_backend(precision: str, cudnn: bool = True, graphs: bool = False):
    from crystal.backends.cuda import CudaBackend

    # flash=False: the cuBLAS + softmax attention path; graphs: every product through cuBLASLt
    return CudaBackend(precision, flash=cudnn, graphs=graphs)


def crystal_run(preset: str, overrides: dict, steps: int, warmup: int, cudnn: bool = True,
                graphs: bool = False) -> dict:
    import cupy as cp

    from crystal.trainer import train

    # dropout off: the PyTorch side has none; no evaluation inside the timed steps
    model_cfg, cfg = resolve(preset, train_overrides={**overrides, "device": "cuda", "steps": steps,
                                                      "dropout": 0.0, "eval_every": 0,
                                                      "cuda_graphs": "on" if graphs else "off"})
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    peak = {"pool_total": 0, "pool_used": 0, "device_used": 0}

    def sample():
        free, total = cp.cuda.runtime.memGetInfo()
        peak["pool_total"] = max(peak["pool_total"], pool.total_bytes())
        peak["pool_used"] = max(peak["pool_used"], pool.used_bytes())
        peak["device_used"] = max(peak["device_used"], total - free)

    marks = []

    def on_step(rec, spheres):
        marks.append(time.perf_counter())
        sample()

    be = crystal_backend(overrides["precision"], cudnn, graphs)
    t0 = time.perf_counter()
    result = train(model_cfg, cfg, backend=be, on_step=on_step)
    sample()
    timed = marks[warmup:]
    out = {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
           "first_step_s": round(marks[0] - t0, 2), "flash": bool(getattr(be, "flash", False)),
           "pool_peak_bytes": peak["pool_total"], "pool_used_peak_bytes": peak["pool_used"],
           "device_used_peak_bytes": peak["device_used"],
           "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4),
           "launches_per_step": result.root.get("launches_per_step"),
           "graph_launches_per_step": result.root.get("graph_launches_per_step")}
    del result, be
    gc.collect()
    pool.free_all_blocks()
    return out


# --- PyTorch -------------------------------------------------------------------------------------

def torch_forward(p: dict, cfg, idx, sdpa: bool):
    """Logits of GPT-2 (pre-LN, tanh GELU, tied head); 2-D weights in nn.Linear layout."""
    import torch
    import torch.nn.functional as F

    B, T = idx.shape
    C, NH, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
    hs = C // NH
    mask = None if sdpa else torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    for l in range(cfg.n_layer):
        h = f"transformer.h.{l}."
        y = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        qkv = F.linear(y, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in qkv.split(C, dim=2))
        if sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        y = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        y = F.gelu(F.linear(y, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]), approximate="tanh")
        x = x + F.linear(y, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return F.linear(x, p["transformer.wte.weight"])


_COMPILED = {}


def torch_loss_fn(model_cfg, precision: str, compiled: bool):
    import torch
    import torch.nn.functional as F

    bf16 = precision == "bf16"

    def loss_fn(p, xy):
        with torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=bf16):
            logits = torch_forward(p, model_cfg, xy[:, :-1], sdpa=bf16)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), xy[:, 1:].reshape(-1))

    if not compiled:
        return loss_fn
    key = (model_cfg, precision)
    if key not in _COMPILED:  # once per process: later rounds reuse the compiled graphs
        _COMPILED[key] = torch.compile(loss_fn)
    return _COMPILED[key]


def torch_run(preset: str, overrides: dict, steps: int, warmup: int, precision: str, compiled: bool) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    model_cfg, cfg = resolve(preset, train_overrides=overrides)
    layout = ParamLayout(model_cfg)
    views = layout.views(init_params(model_cfg, cfg.seed))
    p = {}
    for k, v in views.items():
        arr = v.T.copy() if k.endswith(CONV1D) else v.copy()
        p[k] = torch.tensor(arr, device=TORCH_DEVICE, requires_grad=True)
    groups = [{"params": [p[s.name] for s in layout.specs if s.decay], "weight_decay": cfg.weight_decay},
              {"params": [p[s.name] for s in layout.specs if not s.decay], "weight_decay": 0.0}]
    cuda = TORCH_DEVICE == "cuda"
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cuda)
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len + 1)
    batches = [torch.tensor(rng.integers(0, model_cfg.vocab_size, shape), device=TORCH_DEVICE)
               for _ in range(cfg.micro_batches)]
    loss_fn = torch_loss_fn(model_cfg, precision, compiled)
    params = list(p.values())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    marks, losses = [], []
    for _ in range(steps):
        total = 0.0
        for xy in batches:
            loss = loss_fn(p, xy)
            (loss / cfg.micro_batches).backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / cfg.micro_batches)
        sync()
        marks.append(time.perf_counter())
    timed = marks[warmup:]
    steady = (timed[-1] - timed[0]) / (len(timed) - 1)
    out = {"tokens_per_s": cfg.tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
           "first_step_s": round(marks[0] - t0, 2),
           "max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
           "max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
           "loss_first": round(float(losses[0]), 4), "loss_last": round(float(losses[-1]), 4)}
    if compiled:  # compile time: the first step's excess over a steady step
        out["compile_s"] = round(marks[0] - t0 - steady, 1)
    del p, opt, batches, params, groups, loss, losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None,
                    help="precisions to measure [every one that applies here]")
    ap.add_argument("--spheres", type=int, default=4, help="crystal's sphere streams")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch [preset's]")
    ap.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step [preset's]")
    ap.add_argument("--torch-compile", action="store_true", help="also time the PyTorch step under torch.compile")
    ap.add_argument("--no-cudnn", action="store_true", help="crystal bf16: cuBLAS + softmax attention, not cuDNN")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time crystal with --cuda-graphs on")
    ap.add_argument("--no-torch", action="store_true", help="crystal only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.steps - args.warmup_steps < 2:
        ap.error("--steps must exceed --warmup-steps by at least 2")
    import cupy as cp

    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    model_cfg, cfg = resolve(args.preset, train_overrides={"batch_size": args.batch_size, "spheres": args.spheres,
                                                           "micro_batches": args.micro_batches})
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    skipped = {}
    precisions = args.precision
    if precisions is None:
        precisions = ["fp32", "tf32", "bf16"]
    if "bf16" in precisions:
        why = bf16_unavailable()
        if why:
            skipped["bf16"] = why
            precisions = [p for p in precisions if p != "bf16"]
            print(f"bf16 skipped: {why}")
    out = {"device": device, "preset": args.preset, "spheres": cfg.spheres, "steps": args.steps,
           "warmup_steps": args.warmup_steps, "rounds": args.rounds,
           "batch_size": cfg.batch_size, "micro_batches": cfg.micro_batches, "seq_len": cfg.seq_len,
           "tokens_per_step": cfg.tokens_per_step,
           "model": {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd,
                     "block_size": model_cfg.block_size, "vocab_size": model_cfg.vocab_size},
           "parameters": ParamLayout(model_cfg).n_params, "flops_per_token": fpt,
           "data_note": ("vocabulary from the default data: the embedded corpus's bytes (256), not GPT-2's "
                         "50257 BPE tokens" if model_cfg.vocab_size == 256 else ""),
           "torch_adamw": "fused", "date": time.strftime("%Y-%m-%d"), "skipped": skipped, "rows": [],
           "complete": False}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    save()
    sides = ["crystal"] + (["crystal_graphs"] if args.cuda_graphs else []) + ([] if args.no_torch else ["torch"] + (["torch_compile"] if args.torch_compile else []))
    for precision in precisions:
        row = {"precision": precision}
        out["rows"].append(row)
        try:
            peak, how = matmul_peak(precision)
        except Exception as e:
            peak, how = float("nan"), _err(e)
        row["matmul_peak_tflops"], row["matmul_peak_by"] = round(peak / 1e12, 1), how
        ov = {"spheres": cfg.spheres, "precision": precision, "batch_size": cfg.batch_size,
              "micro_batches": cfg.micro_batches}
        runs = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides:
                if row.get(f"{side}_error"):
                    continue  # it failed once: do not spend the time again
                t0 = time.perf_counter()
                try:
                    if side.startswith("crystal"):
                        res = crystal_run(args.preset, ov, args.steps, args.warmup_steps, not args.no_cudnn,
                                          graphs=side == "crystal_graphs")
                    else:
                        res = torch_run(args.preset, ov, args.steps, args.warmup_steps, precision,
                                        compiled=side == "torch_compile")
                except Exception as e:
                    traceback.print_exc()
                    row[f"{side}_error"] = _err(e)
                    print(json.dumps({"precision": precision, "round": r, "side": side, "error": row[f"{side}_error"]}))
                    save()
                    continue
                res["wall_s"] = round(time.perf_counter() - t0, 1)
                runs[side].append(res)
                print(json.dumps({"precision": precision, "round": r, "side": side,
                                  **{k: (round(v) if isinstance(v, float) and v > 100 else v) for k, v in res.items()}}))
                summarize(row, runs, fpt, peak, model_cfg, cfg, precision)
                save()
        print(json.dumps(row))
    out["complete"] = True
    save()
    print(json.dumps(out, indent=2))


def summarize(row: dict, runs: dict, fpt: float, peak: float, model_cfg, cfg, precision: str) -> None:
    """The row's best-of-rounds figures so far."""
    gib = 2 ** 30
    for side, rs in runs.items():
        if not rs:
            continue
        best = max(r["tokens_per_s"] for r in rs)
        row[f"{side}_tokens_per_s"] = round(best)
        row[f"{side}_mfu"] = round(best * fpt / peak, 4) if peak == peak else None
        row[f"{side}_rounds_tokens_per_s"] = [round(r["tokens_per_s"]) for r in rs]
        if side == "crystal_graphs":
            row["crystal_graphs_launches_per_step"] = rs[-1]["launches_per_step"]
            row["crystal_graph_launches_per_step"] = rs[-1]["graph_launches_per_step"]
        elif side == "crystal":
            row["crystal_launches_per_step"] = rs[-1]["launches_per_step"]
            row["crystal_flash"] = rs[-1]["flash"]
            row["crystal_pool_peak_gib"] = round(max(r["pool_peak_bytes"] for r in rs) / gib, 3)
            row["crystal_pool_used_peak_gib"] = round(max(r["pool_used_peak_bytes"] for r in rs) / gib, 3)
            row["crystal_device_used_peak_gib"] = round(max(r["device_used_peak_bytes"] for r in rs) / gib, 3)
            est = memory_estimate(model_cfg, cfg.micro_batches, cfg.spheres, cfg.batch_size, cfg.seq_len, 1,
                                  precision, rs[-1]["flash"])
            row["crystal_memory_estimate_gib"] = {k: round(v / gib, 3) for k, v in est.items()}
            row["crystal_losses_first_last"] = [rs[-1]["loss_first"], rs[-1]["loss_last"]]
        else:
            row[f"{side}_max_allocated_gib"] = round(max(r["max_allocated_bytes"] for r in rs) / gib, 3)
            row[f"{side}_max_reserved_gib"] = round(max(r["max_reserved_bytes"] for r in rs) / gib, 3)
            if side == "torch_compile":
                row["torch_compile_s"] = rs[0].get("compile_s")
        row[f"{side}_first_step_s"] = rs[0]["first_step_s"]
    c, g = row.get("crystal_tokens_per_s"), row.get("crystal_graphs_tokens_per_s")
    for side in ("torch", "torch_compile"):
        t = row.get(f"{side}_tokens_per_s")
        if c and t:
            row["ratio" if side == "torch" else "ratio_compile"] = round(c / t, 3)
        if g and t:
            row["graphs_ratio" if side == "torch" else "graphs_ratio_compile"] = round(g / t, 3)
    if c and g:
        row["graphs_over_eager"] = round(g / c, 3)
    row["torch_attention"] = ("F.scaled_dot_product_attention(is_causal=True) under autocast bf16"
                              if precision == "bf16" else "explicit masked softmax")


if __name__ == "__main__":
    main()
