"""Muon against AdamW (issue 33): runs bench/bench_quality.py for each configuration of a plan,
one at a time (a run whose JSON exists is not run again), then says for each run the steps and
seconds it needed to reach its seed's default-AdamW final val loss (the target) and the tuned
AdamW's final val loss, as a markdown table.

Usage: python bench/bench_muon.py --preset small [--seeds 1337,1,2] [--steps 2000]
                                  [--eval-every 100] [--plan adamw:1e-3,adamw:2e-3,muon:0.04]
                                  [--sweep muon:0.08 --sweep-seed 1337] [--out bench/muon_runs]
       python bench/bench_muon.py --preset small --step-cost 200 [--rounds 3]

A plan item is OPTIMIZER:LR (for muon, LR is --muon-lr; `muon:0.04/2e-3` also sets AdamW's lr
for the embeddings, head and 1-D parameters). The first item is the default run whose final val
loss per seed is the target. Sweep items run on --sweep-seed only (the losing settings are
reported too). Every run: warmup 100 + cosine to lr/10 for both optimizers, 2 spheres.

--step-cost N: the seconds per step of each optimizer, side by side in this process: N steps of
AdamW then N of Muon (no evaluation), --rounds times alternating, the first 20 steps of each run
not timed; the median round of each and their ratio. A run's seconds to reach a loss are then
its steps to reach it times its optimizer's step time (wall-clock seconds of runs made one after
another on a shared machine are not comparable).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_item(item: str) -> dict:
    opt, lr = item.split(":")
    out = {"optimizer": opt}
    if opt == "muon":
        muon_lr, _, adam_lr = lr.partition("/")
        out["muon_lr"] = muon_lr
        if adam_lr:
            out["lr"] = adam_lr
    else:
        out["lr"] = lr
    return out


def run(preset: str, item: str, seed: int, steps: int, eval_every: int, out: Path) -> dict:
    path = out / f"{preset}_{item.replace(':', '_').replace('/', '_')}_s{seed}_{steps}.json"
    if not path.exists():
        cfg = parse_item(item)
        cmd = [sys.executable, str(HERE / "bench_quality.py"), "--preset", preset, "--steps", str(steps),
               "--eval-every", str(eval_every), "--seed", str(seed), "--json", str(path) + ".part"]
        for k, v in cfg.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        Path(str(path) + ".part").rename(path)
    return json.loads(path.read_text())


def first(rows: list, target: float):
    hit = next((r for r in rows if r["val_loss"] <= target), None)
    return f"{hit['step']} ({hit['seconds']:.0f} s)" if hit else "not reached"


def step_cost(preset: str, steps: int, rounds: int) -> None:
    from crystal.config import resolve
    from crystal.trainer import train

    per = {"adamw": [], "muon": []}
    for _ in range(rounds):
        for opt in per:
            model_cfg, cfg = resolve(preset, train_overrides=dict(steps=steps, optimizer=opt, spheres=2,
                                                                  eval_every=10 * steps))
            stamps = []
            train(model_cfg, cfg, on_step=lambda rec, spheres: stamps.append(time.perf_counter()))
            per[opt].append((stamps[-1] - stamps[19]) / (len(stamps) - 20))
    ms = {k: 1000 * statistics.median(v) for k, v in per.items()}
    print(json.dumps({"preset": preset, "steps": steps, "rounds": rounds, "date": time.strftime("%Y-%m-%d"),
                      "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
                      "rounds_ms": {k: [round(1000 * x, 2) for x in v] for k, v in per.items()},
                      "muon_over_adamw": round(ms["muon"] / ms["adamw"], 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", default="1337,1,2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--plan", default="adamw:1e-3,adamw:2e-3,muon:0.04")
    ap.add_argument("--sweep", action="append", default=[])
    ap.add_argument("--sweep-seed", type=int, default=1337)
    ap.add_argument("--out", default=str(HERE / "muon_runs"))
    ap.add_argument("--step-cost", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.step_cost:
        return step_cost(args.preset, args.step_cost, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    plan = args.plan.split(",")
    runs = [(item, seed) for seed in seeds for item in plan] + [(item, args.sweep_seed) for item in args.sweep]
    results = {(item, seed): run(args.preset, item, seed, args.steps, args.eval_every, out) for item, seed in runs}
    default, tuned = plan[0], plan[1] if len(plan) > 1 and plan[1].startswith("adamw") else plan[0]
    print(f"\n{args.preset}, {args.steps} steps, eval every {args.eval_every}; target = the seed's "
          f"{default} final val loss; 'tuned' = the seed's {tuned} final val loss\n")
    print("| run | seed | final val loss | seconds | reaches target at step (s) | reaches tuned at step (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (item, seed), r in results.items():
        target = results[(default, seed)]["final"]["val_loss"]
        tuned_loss = results[(tuned, seed)]["final"]["val_loss"] if (tuned, seed) in results else None
        fin = r["final"]
        print(f"| {item} | {seed} | {fin['val_loss']:.3f} | {fin['seconds']:.0f} | {first(r['rows'], target)} (target "
              f"{target:.3f}) | {first(r['rows'], tuned_loss) if tuned_loss else '-'} |")


if __name__ == "__main__":
    main()
