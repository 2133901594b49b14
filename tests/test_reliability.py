"""No crash loses work: signals, kill -9, non-finite steps, failing spheres."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crystal.backends.cpu import CpuBackend
from crystal.cli import main
from crystal.model import warm_up

TINY = ["train", "--preset", "tiny", "--spheres", "3", "--log-every", "1000"]


def losses(run: Path) -> list:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in l]


def start(args, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crystal", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(losses_safe(run)) >= n:
            return
        time.sleep(0.05)


def losses_safe(run: Path) -> list:
    try:
        return [l for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    except OSError:
        return []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*TINY, "--steps", "60", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(straight, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start([*TINY, "--steps", "60", "--checkpoint-every", "25"], run)
    wait_for_steps(run, 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "continue with: crystal train --resume" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert losses(run) == losses(straight)


def test_five_kill_9_during_training_then_resume_end_bitwise_identical(straight, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(1)
    args = [*TINY, "--steps", "60", "--checkpoint-every", "1"]
    proc = start(args, run)
    for _ in range(5):
        wait_for_steps(run, len(losses_safe(run)) + rng.randint(2, 8), proc)
        proc.kill()
        proc.wait()
        if (run / "model.safetensors").exists():
            break
        proc = subprocess.Popen([sys.executable, "-m", "crystal", "train", "--resume", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    else:
        proc.wait()
    if not (run / "model.safetensors").exists():
        assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert losses(run) == losses(straight)


class NaNBackend(CpuBackend):
    """The reducer's first chunk reports a NaN sum of squares at one step (1-based)."""

    def __init__(self, at_step: int):
        super().__init__()
        self.steps, self.at = 0, at_step

    def reduce_slots(self, slots, pairs, start, end, inv_m):
        r = super().reduce_slots(slots, pairs, start, end, inv_m)
        if start == 0:  # chunk 0: once per step, on one thread
            self.steps += 1
            if self.steps == self.at:
                return float("nan")
        return r


def test_a_nan_gradient_stops_with_exit_3_and_the_last_good_checkpoint_intact(tmp_path, monkeypatch, capsys):
    import crystal.backends

    monkeypatch.setattr(crystal.backends, "get_backend", lambda d, p, *gpu, **kw: NaNBackend(at_step=8))
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "20", "--checkpoint-every", "5", "--out", str(run)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite gradient norm at step 8" in err[0] and "step-00000005" in err[0]
    ckpt = run / "checkpoints" / "step-00000005"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000005"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["train", "--resume", str(run), "--stop-at", "6"]) == 0  # the checkpoint still loads
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_skip_mode_skips_the_non_finite_step_and_finishes(tmp_path, monkeypatch):
    import crystal.backends

    monkeypatch.setattr(crystal.backends, "get_backend", lambda d, p, *gpu, **kw: NaNBackend(at_step=4))
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "8", "--on-nonfinite", "skip", "--out", str(run)]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "skipped" in l] == [4]
    assert len([l for l in lines if "loss" in l]) == 7


class FailingBackend(CpuBackend):
    def gelu_forward(self, out, inp):
        import threading

        if threading.current_thread().name == "sphere-7":
            raise RuntimeError("injected failure in sphere 7")
        super().gelu_forward(out, inp)


def test_an_exception_in_sphere_7_ends_the_run_within_5_seconds_with_that_error(tmp_path):
    from crystal.config import resolve
    from crystal.errors import SphereFailure
    from crystal.trainer import train

    be = FailingBackend()
    warm_up(be)
    t0 = time.perf_counter()
    with pytest.raises(SphereFailure, match="sphere 7 failed: RuntimeError: injected failure in sphere 7"):
        train(*resolve("tiny", train_overrides=dict(spheres=12, steps=50)), backend=be)
    assert time.perf_counter() - t0 < 5


def test_a_second_ctrl_c_exits_at_once_and_leaves_the_checkpoints_intact(tmp_path):
    run = tmp_path / "run"
    proc = start([*TINY, "--steps", "100", "--checkpoint-every", "1"], run)
    wait_for_steps(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    from crystal.checkpoint import latest_checkpoint

    assert latest_checkpoint(run) is not None  # every complete checkpoint still loads
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert len(losses(run)) == 100
