"""--precision bf16 against fp32 on a GPU, at shakespeare-char shapes; JSON out, exit 1 on a failed check.

Usage (GPU machine, repository root): PYTHONPATH=. python3 bench/bench_bf16_check.py [--json OUT]
    [--preset shakespeare-char] [--steps 50] [--tail 10] [--spheres 4] [--bitwise-steps 5]

Checks (every run from the same seed: the same initial parameters and the same batches):
  first_step    the step-1 loss (same parameters, same batch) of bf16 within --first-tol (2e-2)
                relative of fp32 (cuBLAS pedantic fp32);
  trajectory    over --steps steps (dropout off), the mean relative difference of the last --tail
                step losses between bf16 and fp32 within --traj-tol (2%);
  bitwise       bf16 with 1 and with --spheres spheres (the preset's dropout on, --bitwise-steps
                steps): identical losses and final parameters, bit for bit.
Each bf16 check runs with cuDNN flash attention when it is available here and again with it
forced off (CRYSTAL_CUDNN=0 while the backend is made: the cuBLAS + softmax attention path), so
both attention paths are covered on a machine that has cuDNN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crystal.config import resolve  # noqa: E402


def backend(precision: str, flash: bool | None):
    """A CudaBackend; flash False forces the cuBLAS attention path, None keeps the default."""
    from crystal.backends.cuda import CudaBackend

    return CudaBackend(precision, flash=flash is not False)


def run(preset: str, precision: str, spheres: int, steps: int, flash: bool | None, dropout: float | None):
    from crystal.trainer import train

    over = dict(device="cuda", precision=precision, spheres=spheres, steps=steps, eval_every=0)
    if dropout is not None:
        over["dropout"] = dropout
    model_cfg, cfg = resolve(preset, train_overrides=over)
    be = backend(precision, flash)
    t0 = time.perf_counter()
    res = train(model_cfg, cfg, backend=be)
    return {"losses": [float(x) for x in res.losses], "params": res.params, "flash": bool(getattr(be, "flash", False)),
            "seconds": round(time.perf_counter() - t0, 1), "dropout": cfg.dropout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tail", type=int, default=10)
    ap.add_argument("--spheres", type=int, default=4)
    ap.add_argument("--bitwise-steps", type=int, default=5)
    ap.add_argument("--first-tol", type=float, default=2e-2)
    ap.add_argument("--traj-tol", type=float, default=2e-2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy as cp

    out = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "preset": args.preset,
           "steps": args.steps, "tail": args.tail, "spheres": args.spheres, "bitwise_steps": args.bitwise_steps,
           "first_tol": args.first_tol, "traj_tol": args.traj_tol, "date": time.strftime("%Y-%m-%d"),
           "checks": {}, "runs": {}, "errors": {}, "complete": False}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
            save()
            return None

    def record(name, r):
        if r is not None:
            out["runs"][name] = {"flash": r["flash"], "seconds": r["seconds"], "dropout": r["dropout"],
                                 "losses": [round(x, 5) for x in r["losses"]]}
            print(f"{name}: flash={r['flash']} {r['seconds']} s, losses {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}", flush=True)
        save()

    probe = guarded("bf16_backend", lambda: backend("bf16", None))
    out["flash_available"] = bool(getattr(probe, "flash", False))
    try:
        from crystal.backends.cudnn_attention import unavailable_reason

        out["cudnn_unavailable_reason"] = unavailable_reason()
    except Exception as e:
        out["cudnn_unavailable_reason"] = f"{type(e).__name__}: {e}"[:200]
    del probe
    fp32 = guarded("fp32", lambda: run(args.preset, "fp32", args.spheres, args.steps, None, 0.0))
    record("fp32", fp32)
    bf = guarded("bf16", lambda: run(args.preset, "bf16", args.spheres, args.steps, None, 0.0))
    record("bf16", bf)
    variants = [("bf16", bf)]
    if out["flash_available"]:  # cuDNN here: also the cuBLAS + softmax path
        nf = guarded("bf16_noflash", lambda: run(args.preset, "bf16", args.spheres, args.steps, False, 0.0))
        record("bf16_noflash", nf)
        variants.append(("bf16_noflash", nf))
    for name, r in variants:
        if fp32 is None or r is None:
            continue
        a, b = np.array(fp32["losses"]), np.array(r["losses"])
        first = abs(b[0] - a[0]) / abs(a[0])
        rel = np.abs(b - a) / np.abs(a)
        tail = float(rel[-args.tail:].mean())
        out["checks"][f"{name}_first_step"] = {"rel": float(first), "ok": bool(first <= args.first_tol)}
        out["checks"][f"{name}_trajectory"] = {"mean_rel_last": tail, "max_rel": float(rel.max()),
                                               "ok": bool(tail <= args.traj_tol)}
    save()
    for name, flash in (("bf16", None), ("bf16_noflash", False)):
        if name == "bf16_noflash" and not out["flash_available"]:
            continue
        one = guarded(f"{name}_s1", lambda: run(args.preset, "bf16", 1, args.bitwise_steps, flash, None))
        many = guarded(f"{name}_s{args.spheres}",
                       lambda: run(args.preset, "bf16", args.spheres, args.bitwise_steps, flash, None))
        if one is None or many is None:
            continue
        same_loss = one["losses"] == many["losses"]
        same_params = one["params"].tobytes() == many["params"].tobytes()
        diff = int(np.count_nonzero(one["params"] != many["params"]))
        out["checks"][f"{name}_bitwise_1_vs_{args.spheres}"] = {
            "flash": many["flash"], "dropout": many["dropout"], "losses_equal": same_loss,
            "params_equal": same_params, "params_differing": diff, "ok": bool(same_loss and same_params),
            "losses_1": [round(x, 6) for x in one["losses"]], f"losses_{args.spheres}": [round(x, 6) for x in many["losses"]]}
        save()
    out["ok"] = bool(out["checks"]) and all(c["ok"] for c in out["checks"].values()) and not out["errors"]
    out["complete"] = True
    save()
    print(json.dumps({k: out[k] for k in ("flash_available", "checks", "errors", "ok")}, indent=2))
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
