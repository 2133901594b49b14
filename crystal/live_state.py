"""live.json: a small file a training run rewrites about once a second, so that a viewer in
another process (`crystal watch`) shows the ring without being part of training.

Written atomically (a temporary file renamed over the old one), so a reader sees the last whole
state or none. It holds the ring (per sphere: batches, average loss, utilization over the run and
over the last steps, tokens/s), the root (step, loss, val loss, lr, gradient norm, tokens/s,
active spheres; with --eval-task: task, task_acc, task_acc_norm) and the run's status: "training", "finished" or "stopped". `LiveStateView` is a
view like the terminal ones (crystal.dashboard): the trainer calls it from its thread, and it
writes at most every `every_s` seconds, and always at the end.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from crystal.atomic import atomic_write_json
from crystal.errors import CrystalError
from crystal.jsonio import read_json

LIVE_FILE = "live.json"
FORMAT = 1


class RecentActivity:
    """Each sphere's utilization over the last `steps` steps (busy seconds / wall seconds), and
    `wait`: its share of that time spent waiting for a core (the core gate)."""

    def __init__(self, steps: int = 10):
        self.steps = steps
        self._history: list[tuple[float, list[float], list[float]]] = []  # (root wall, busy, waiting)
        self.wait: list[float] = []

    def update(self, spheres, rows: list[dict]) -> list[float]:
        self._history.append((spheres.wall_s, [s.busy_s for s in spheres.stats], [s.wait_s for s in spheres.stats]))
        self._history = self._history[-self.steps:]
        (w0, b0, q0), (w1, b1, q1) = self._history[0], self._history[-1]
        span = w1 - w0
        self.wait = [(y - x) / span if span > 0 else 0.0 for x, y in zip(q0, q1)]
        return [(y - x) / span if span > 0 else r["utilization"] for x, y, r in zip(b0, b1, rows)]


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class LiveStateView:
    """Keeps `run_dir/live.json` current while the run trains."""

    def __init__(self, run_dir: str | Path, every_s: float = 1.0):
        self.path = Path(run_dir) / LIVE_FILE
        self.every_s = every_s
        self.recent = RecentActivity()
        self.state: dict = {"format": FORMAT, "status": "starting", "step": 0, "spheres": []}
        self._written = 0.0

    def start(self, info: dict) -> None:
        c = info["config"]
        self.state.update(preset=c.preset, device=info["device"], ranks=info.get("ranks", 1),
                          steps=info["steps"], first=info["first"], step=info["first"], status="training")
        self._write()

    def step(self, rec, spheres) -> None:
        rows = spheres.summary()
        recent = self.recent.update(spheres, rows)
        self.state.update(step=rec.step, loss=_finite(rec.loss), lr=rec.lr, grad_norm=_finite(rec.grad_norm),
                          tokens_per_s=rec.tokens_per_s, elapsed=rec.elapsed, active=spheres.active_spheres(),
                          spheres=[{**r, "recent": u, "recent_wait": q}
                                   for r, u, q in zip(rows, recent, self.recent.wait)])
        if time.monotonic() - self._written >= self.every_s:
            self._write()

    def eval(self, step: int, val_loss: float) -> None:
        self.state["val_loss"] = _finite(val_loss)

    def task(self, rec) -> None:
        self.state.update(task=rec.task, task_acc=rec.task_acc, task_acc_norm=rec.task_acc_norm)

    def close(self) -> None:
        if self.state["status"] == "starting":  # training never started (a bad input): write nothing
            return
        self.state["status"] = "finished" if self.state.get("step") == self.state.get("steps") else "stopped"
        self._write()

    def _write(self) -> None:
        self.state["time"] = time.time()
        atomic_write_json(self.path, self.state)
        self._written = time.monotonic()


def read_live_state(run_dir: str | Path) -> dict | None:
    """The run's last live state, or None (not written yet, or not JSON); NaN and infinities
    read as None (the state goes to a page as JSON, which has neither)."""
    try:
        state = read_json(Path(run_dir) / LIVE_FILE, finite=True)
    except (OSError, CrystalError):
        return None
    return state if isinstance(state, dict) else None
