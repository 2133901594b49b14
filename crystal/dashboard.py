"""What the user watches: the live sphere ring in a terminal, plain lines elsewhere.

The trainer calls `on_start`, `on_step` and `on_eval` of a view from its own thread; a view
only copies numbers into a `Snapshot` there. `LiveView` renders the latest snapshot from rich's
refresh thread (twice a second; a 12-sphere frame takes ~9 ms here), so drawing never sits on the training path. `PlainView`
prints escape-free lines every `log_every` steps (CI, pipes, nohup); `QuietView` prints
nothing until the final summary.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import click

from crystal.live_state import RecentActivity

SPARK = "▁▂▃▄▅▆▇█"
# activity buckets by a sphere's utilization over the last steps: (threshold, name, style)
ACTIVITY = [(0.75, "very active", "bold bright_yellow"), (0.40, "active", "green"),
            (0.05, "some", "cyan"), (0.0, "idle", "grey50")]


WAITING = ("waiting for a core", "magenta")  # the core gate held it back more than it computed


def activity(utilization: float, waiting: float = 0.0) -> tuple[str, str]:
    """(bucket name, rich style) of a utilization in [0, 1] and the share spent waiting for a core."""
    if waiting >= 0.05 and waiting > utilization:
        return WAITING
    for threshold, name, style in ACTIVITY:
        if utilization >= threshold:
            return name, style
    return ACTIVITY[-1][1], ACTIVITY[-1][2]


def sparkline(values: list[float], width: int = 24) -> str:
    vals = [v for v in values[-width:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


@dataclass
class Snapshot:
    """Numbers the view shows; written by the training thread, read by the render thread."""

    preset: str = ""
    device: str = ""
    steps: int = 0
    first: int = 0
    step: int = 0
    loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    task: str = ""  # --eval-task's file name, and its latest scores
    task_acc: float | None = None
    task_acc_norm: float | None = None
    lr: float = 0.0
    grad_norm: float = 0.0
    tokens_per_s: float = 0.0
    ms_per_step: float = 0.0
    elapsed: float = 0.0
    spheres: list[dict] = field(default_factory=list)  # batches, avg_loss, utilization, tokens_per_s
    recent_util: list[float] = field(default_factory=list)  # per sphere, over the last steps
    recent_wait: list[float] = field(default_factory=list)  # per sphere: share spent waiting for a core


def where(info: dict, ring: bool = False) -> str:
    """The device, and the ranks when there are several (the live view shows rank 0's ring)."""
    ranks = info.get("ranks", 1)
    if ranks == 1:
        return info["device"]
    return f"{info['device']} x {ranks} ranks" + (" (rank 0's ring)" if ring else "")


def ring(spheres: list[dict], recent_util: list[float] | None = None, radius: int = 0,
         recent_wait: list[float] | None = None):
    """The sphere ring around ROOT as rich Text: one marker `●<batches>` per sphere on a circle,
    colored by activity."""
    from rich.text import Text

    n = len(spheres)
    r = radius or max(4, min(12, 2 + n // 2))
    width, height = 4 * r + 12, 2 * r + 3
    cx, cy = width // 2, height // 2
    grid = [[(" ", "")] * width for _ in range(height)]

    def put(x: int, y: int, text: str, style: str) -> None:
        x = max(0, min(width - len(text), x))
        for i, ch in enumerate(text):
            grid[y][x + i] = (ch, style)

    put(cx - 2, cy, "ROOT", "bold magenta")
    for i, s in enumerate(spheres):
        angle = 2 * math.pi * i / max(1, n) - math.pi / 2
        x = cx + int(round(2 * r * math.cos(angle)))
        y = cy + int(round(r * math.sin(angle)))
        util = recent_util[i] if recent_util and i < len(recent_util) else s.get("utilization", 0.0)
        _, style = activity(util, recent_wait[i] if recent_wait and i < len(recent_wait) else 0.0)
        label = f"●{s['batches']}"
        put(x - len(label) // 2, y, label, style)
    text = Text()
    for row in grid:
        run, run_style = "", ""
        for ch, style in row:  # one span per run of equal style
            if style != run_style and run:
                text.append(run, style=run_style or None)
                run = ""
            run, run_style = run + ch, style
        text.append(run.rstrip() if not run_style else run, style=run_style or None)
        text.append("\n")
    return text


def sphere_table(spheres: list[dict]):
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("sphere", "batches", "avg loss", "busy %", "tokens/s"):
        t.add_column(col, justify="right")
    for s in spheres:
        avg = f"{s['avg_loss']:.4f}" if s.get("avg_loss") is not None else "-"
        t.add_row(str(s["sphere"]), str(s["batches"]), avg, f"{100 * s['utilization']:.1f}",
                  f"{s['tokens_per_s']:,.0f}")
    return t


def render(snap: Snapshot):
    """The whole live view of a snapshot: header, progress, ring, table."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    done = snap.step - snap.first
    todo = snap.steps - snap.step
    eta = snap.elapsed / done * todo if done > 0 else float("nan")
    head = Text.assemble(("crystal ", "bold"), f"{snap.preset} on {snap.device} | ",
                         (f"step {snap.step}/{snap.steps}", "bold"),
                         f" | ETA {_fmt_s(eta)} | elapsed {_fmt_s(snap.elapsed)}")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(1, snap.steps), completed=snap.step, width=60),
                f"{100 * snap.step / max(1, snap.steps):.0f}%")
    stats = Table.grid(padding=(0, 2))
    stats.add_row(f"loss {snap.loss:.4f}", sparkline(snap.losses),
                  f"val {snap.val_loss:.4f}" if snap.val_loss is not None else "val -")
    stats.add_row(f"lr {snap.lr:.2e}", f"grad norm {snap.grad_norm:.3f}",
                  f"{snap.tokens_per_s:,.0f} tok/s | {snap.ms_per_step:.0f} ms/step")
    if snap.task:
        scores = "-" if snap.task_acc is None else f"acc {snap.task_acc:.4f} | acc_norm {snap.task_acc_norm:.4f}"
        stats.add_row(snap.task, scores, "")
    buckets = [(name, style) for _, name, style in ACTIVITY] + [WAITING]
    legend = Text.assemble(*[(f"■ {name}  ", style) for name, style in buckets])
    return Group(head, bar, stats, ring(snap.spheres, snap.recent_util, recent_wait=snap.recent_wait), legend,
                 sphere_table(snap.spheres))


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class PlainView:
    """Escape-free progress lines: a header, a line every log_every steps, eval lines."""

    def __init__(self, out_dir, log_every: int):
        self.out_dir, self.log_every, self.steps = out_dir, log_every, 0

    def start(self, info: dict) -> None:
        c, m = info["config"], info["model"]
        self.steps = info["steps"]
        heads = f"{m.n_head} heads on {m.kv_heads} KV heads" if m.llama else f"{m.n_head} heads"
        click.echo(f"crystal: preset {c.preset} ({m.arch}: {m.n_layer} layers, {heads}, {m.n_embd} wide, "
                   f"vocab {m.vocab_size}, {info['params'] / 1e6:.2f}M params) on {where(info)} "
                   f"with {c.spheres} spheres" + (" per rank" if info.get("ranks", 1) > 1 else ""))
        click.echo(f"data: {info['data']} ({info['tokens']:,} train / {info['val_tokens']:,} val tokens); "
                   f"{c.steps} steps x {c.micro_batches} micro-batches x {c.batch_size} x {c.seq_len} "
                   f"tokens; run: {self.out_dir}")
        if info["first"]:
            click.echo(f"resuming after step {info['first']}")

    def step(self, rec, spheres) -> None:
        if rec.step % self.log_every and rec.step not in (1, self.steps):
            return
        click.echo(f"step {rec.step:>{len(str(self.steps))}}/{self.steps} | loss {rec.loss:.4f} | "
                   f"lr {rec.lr:.2e} | norm {rec.grad_norm:.3f} | {rec.tokens_per_s:,.0f} tok/s | "
                   f"{rec.ms_per_step:.1f} ms/step")

    def eval(self, step: int, val_loss: float) -> None:
        click.echo(f"step {step:>{len(str(self.steps))}}/{self.steps} | val loss {val_loss:.4f}")

    def task(self, rec) -> None:
        click.echo(f"step {rec.step:>{len(str(self.steps))}}/{self.steps} | {rec.task} acc {rec.task_acc:.4f} | "
                   f"acc_norm {rec.task_acc_norm:.4f} ({rec.task_examples:,} examples)")

    def close(self) -> None:
        pass


class QuietView(PlainView):
    """Nothing while training (errors and the final summary still print)."""

    def start(self, info: dict) -> None:
        pass

    def step(self, rec, spheres) -> None:
        pass

    def eval(self, step: int, val_loss: float) -> None:
        pass

    def task(self, rec) -> None:
        pass


class LiveView:
    """The sphere ring, progress and table, redrawn by rich from the latest snapshot."""

    RECENT = 10  # steps over which a sphere's activity is measured

    def __init__(self, console=None, refresh_per_second: float = 2.0):
        from rich.console import Console

        self.console = console or Console()
        self.snap = Snapshot()
        self._lock = threading.Lock()
        self._live = None
        self._refresh = refresh_per_second
        self._recent = RecentActivity(self.RECENT)

    def start(self, info: dict) -> None:
        from rich.live import Live

        c = info["config"]
        with self._lock:
            self.snap.preset, self.snap.device = c.preset, where(info, ring=True)
            self.snap.steps, self.snap.first, self.snap.step = info["steps"], info["first"], info["first"]
            if c.eval_task:
                self.snap.task = os.path.basename(c.eval_task)
        self._live = Live(get_renderable=self._renderable, console=self.console,
                          refresh_per_second=self._refresh, transient=False)
        self._live.start()

    def _renderable(self):
        with self._lock:
            return render(self.snap)

    def step(self, rec, spheres) -> None:
        rows = spheres.summary()
        recent = self._recent.update(spheres, rows)
        with self._lock:
            s = self.snap
            s.step, s.loss, s.lr, s.grad_norm = rec.step, rec.loss, rec.lr, rec.grad_norm
            s.tokens_per_s, s.ms_per_step, s.elapsed = rec.tokens_per_s, rec.ms_per_step, rec.elapsed
            s.losses = (s.losses + [rec.loss])[-200:]
            s.spheres, s.recent_util, s.recent_wait = rows, recent, self._recent.wait

    def eval(self, step: int, val_loss: float) -> None:
        with self._lock:
            self.snap.val_loss = val_loss

    def task(self, rec) -> None:
        with self._lock:
            self.snap.task, self.snap.task_acc, self.snap.task_acc_norm = rec.task, rec.task_acc, rec.task_acc_norm

    def close(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None


class Tee:
    """Several views as one: each call goes to every view, in order."""

    def __init__(self, *views):
        self.views = [v for v in views if v is not None]

    def start(self, info: dict) -> None:
        for v in self.views:
            v.start(info)

    def step(self, rec, spheres) -> None:
        for v in self.views:
            v.step(rec, spheres)

    def eval(self, step: int, val_loss: float) -> None:
        for v in self.views:
            v.eval(step, val_loss)

    def task(self, rec) -> None:
        """A TaskRecord (crystal.trainer): --eval-task's scores at a step."""
        for v in self.views:
            v.task(rec)

    def close(self) -> None:
        for v in self.views:
            v.close()
