"""`crystal train --log tensorboard`: TensorBoard event files in the run directory (tensorboardX,
the `tensorboard` extra), beside metrics.jsonl: per step loss, lr, grad_norm and tokens_per_s;
val_loss at each evaluation; task_acc and task_acc_norm at each --eval-task scoring; per sphere
its batches and average loss (spheres/N/...).
`tensorboard --logdir RUN` shows them. A view like the terminal ones (crystal.dashboard)."""

from __future__ import annotations

from pathlib import Path

from crystal.errors import CrystalError


class TensorBoardView:
    """Checks for tensorboardX when made; the event file is created at `start`, after the run's
    first write (which, with --overwrite, clears the old run's event files, not this one)."""

    def __init__(self, run_dir: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise CrystalError(f"--log tensorboard needs tensorboardX (pip install 'crystal[tensorboard]'): {e}") from None
        self._open = lambda: SummaryWriter(logdir=str(run_dir), flush_secs=5)
        self.writer = None

    def start(self, info: dict) -> None:
        self.writer = self._open()

    def step(self, rec, spheres) -> None:
        w, s = self.writer, rec.step
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            w.add_scalar(name, getattr(rec, name), s)
        for row in spheres.summary():
            w.add_scalar(f"spheres/{row['sphere']}/batches", row["batches"], s)
            if row["avg_loss"] is not None:
                w.add_scalar(f"spheres/{row['sphere']}/avg_loss", row["avg_loss"], s)

    def eval(self, step: int, val_loss: float) -> None:
        self.writer.add_scalar("val_loss", val_loss, step)

    def task(self, rec) -> None:
        self.writer.add_scalar("task_acc", rec.task_acc, rec.step)
        self.writer.add_scalar("task_acc_norm", rec.task_acc_norm, rec.step)

    def close(self) -> None:
        if self.writer is not None:  # None: training never started
            self.writer.close()
