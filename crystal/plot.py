"""`crystal plot`: loss against step and against time for several runs, and per-sphere bars.

matplotlib is optional (the `plot` extra); without it the command says so in one line.
Every input is read and checked before drawing: a malformed line of metrics.jsonl or a malformed
spheres.json is a one-line error. The image is drawn in memory and written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from crystal.atomic import atomic_write_bytes
from crystal.errors import CrystalError
from crystal.jsonio import parse_json, read_json

FORMATS = ("png", "svg", "pdf")  # chosen by --out's suffix
MIN_SIZE, MAX_SIZE = (200, 150), 10_000  # pixels: (width, height) at least, each at most
# The fields each record must hold as numbers: a train line (it has "loss"), an eval line ("val_loss").
TRAIN_KEYS, EVAL_KEYS = ("step", "loss", "elapsed"), ("step", "val_loss")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x) -> bool:
    return _number(x) and math.isfinite(x)


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a run's metrics.jsonl, each line checked. Only whole lines
    count: a last line without its newline (a run still writing it) is skipped unless it parses."""
    path = run / "metrics.jsonl"
    try:
        *lines, tail = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise CrystalError(f"{run} has no metrics.jsonl (not a crystal run?)") from None
    except OSError as e:
        raise CrystalError(f"cannot read {path}: {e.strerror or e}") from None
    records = [_record(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if tail.strip():
        try:
            records.append(_record(path, len(lines) + 1, tail))
        except CrystalError:
            pass  # torn: the rest of it is still to be written
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def _record(path: Path, n: int, line: bytes) -> dict:
    """One metrics line: a JSON object whose train or eval fields are numbers (step, elapsed finite)."""
    rec = parse_json(line, f"{path}: line {n}")
    if not isinstance(rec, dict):
        raise CrystalError(f"{path}: line {n} is not a JSON object")
    keys = (TRAIN_KEYS if "loss" in rec else ()) + (EVAL_KEYS if "val_loss" in rec else ())
    for key in keys:
        if not (_finite(rec.get(key)) if key in ("step", "elapsed") else _number(rec.get(key))):
            raise CrystalError(f"{path}: line {n} has no number {key!r} (got {rec.get(key)!r:.40})")
    return rec


def read_spheres(run: Path) -> list[dict] | None:
    """The per-sphere records of a run's spheres.json; None while it has none (training)."""
    path = run / "spheres.json"
    try:
        spheres = read_json(path)["spheres"]
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CrystalError(f"cannot read {path}: {e.strerror or e}") from None
    except (KeyError, TypeError, IndexError) as e:
        raise CrystalError(f"{path}: not a spheres.json ({type(e).__name__}: {e})") from None
    if not isinstance(spheres, list) or not all(
            isinstance(s, dict) and _finite(s.get("sphere")) and _finite(s.get("batches"))
            and (s.get("avg_loss") is None or _number(s["avg_loss"])) for s in spheres):
        raise CrystalError(f"{path}: not a spheres.json (\"spheres\" must list objects with numbers "
                           "sphere, batches and avg_loss)")
    return spheres


def image_format(out: Path) -> str:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise CrystalError(f"--out {out}: unsupported image format {out.suffix or '(no suffix)'!r}; "
                           f"give a file ending in {', '.join('.' + f for f in FORMATS)}")
    return fmt


def plot_runs(runs: list[Path], out: Path, width: int, height: int, dpi: int = 100) -> None:
    fmt = image_format(out)
    min_w, min_h = MIN_SIZE
    if not (min_w <= width <= MAX_SIZE and min_h <= height <= MAX_SIZE):
        raise CrystalError(f"--width/--height {width}x{height} out of range: {min_w}-{MAX_SIZE:,} by "
                           f"{min_h}-{MAX_SIZE:,} pixels")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CrystalError("crystal plot needs matplotlib: pip install 'crystal[plot]'") from None
    data = [(run, *read_metrics(run), read_spheres(run)) for run in runs]
    fig, (ax_step, ax_time, ax_sph) = plt.subplots(1, 3, figsize=(width / dpi, height / dpi), dpi=dpi)
    for run, train, evals, _ in data:
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
    for k, (run, _, _, spheres) in enumerate(data):
        if spheres is None:
            continue
        xs = [s["sphere"] + k * width_bar for s in spheres]
        ax_sph.bar(xs, [s["batches"] for s in spheres], width=width_bar, label=f"{run.name} batches")
        ax_loss.plot(xs, [s["avg_loss"] if s.get("avg_loss") is not None else float("nan") for s in spheres],
                     "k.", ms=5)
    ax_sph.set(xlabel="sphere", ylabel="batches", title="per sphere (dots: avg loss)")
    ax_loss.set_ylabel("avg loss")
    if ax_sph.get_legend_handles_labels()[0]:  # a legend without entries warns
        ax_sph.legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
    try:
        atomic_write_bytes(out, image.getvalue())  # an existing file is replaced whole or kept
    except OSError as e:
        raise CrystalError(f"cannot write {out}: {e.strerror or e}") from None
