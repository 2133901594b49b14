"""`crystal plot`: loss against step and against time for several runs, and per-sphere bars.

matplotlib is optional (the `plot` extra); without it the command says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from crystal.errors import CrystalError


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    try:
        lines = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except FileNotFoundError:
        raise CrystalError(f"{run} has no metrics.jsonl (not a crystal run?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrystalError(f"{path}: unreadable ({e})") from None
    return [l for l in lines if "loss" in l], [l for l in lines if "val_loss" in l]


def plot_runs(runs: list[Path], out: Path, width: int, height: int, dpi: int = 100) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CrystalError("crystal plot needs matplotlib: pip install 'crystal[plot]'") from None
    if width < 200 or height < 150:
        raise CrystalError(f"--width/--height too small ({width}x{height}); at least 200x150 pixels")
    data = [(run, *read_metrics(run)) for run in runs]
    fig, (ax_step, ax_time, ax_sph) = plt.subplots(1, 3, figsize=(width / dpi, height / dpi), dpi=dpi)
    for run, train, evals in data:
        name = run.name
        line, = ax_step.plot([l["step"] for l in train], [l["loss"] for l in train], lw=1, label=f"{name} train")
        ax_time.plot([l["elapsed"] for l in train], [l["loss"] for l in train], lw=1, color=line.get_color(),
                     label=f"{name} train")
        if evals:
            steps = [e["step"] for e in evals]
            ax_step.plot(steps, [e["val_loss"] for e in evals], "o--", ms=3, color=line.get_color(),
                         label=f"{name} val")
            elapsed = {l["step"]: l["elapsed"] for l in train}
            pts = [(elapsed[s], e["val_loss"]) for s, e in zip(steps, evals) if s in elapsed]
            if pts:
                ax_time.plot(*zip(*pts), "o--", ms=3, color=line.get_color(), label=f"{name} val")
    ax_step.set(xlabel="step", ylabel="loss (nats/token)", title="loss vs step")
    ax_time.set(xlabel="seconds", ylabel="loss (nats/token)", title="loss vs time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    width_bar = 0.8 / len(data)
    ax_loss = ax_sph.twinx()
    for k, (run, _, _) in enumerate(data):
        try:
            spheres = json.loads((run / "spheres.json").read_text(encoding="utf-8"))["spheres"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        xs = [s["sphere"] + k * width_bar for s in spheres]
        ax_sph.bar(xs, [s["batches"] for s in spheres], width=width_bar, label=f"{run.name} batches")
        ax_loss.plot(xs, [s["avg_loss"] if s["avg_loss"] is not None else float("nan") for s in spheres],
                     "k.", ms=5)
    ax_sph.set(xlabel="sphere", ylabel="batches", title="per sphere (dots: avg loss)")
    ax_loss.set_ylabel("avg loss")
    ax_sph.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=dpi)
    except OSError as e:
        raise CrystalError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
