"""`crystal train` with no options trains the default preset on the embedded corpus to a
train loss (mean of the last 20 steps) below 2.0 nats per byte; the byte bigram baseline is
2.49. This is the longest test (a few minutes on 2 cores); its wall time is recorded by
bench/bench_default_run.py, not asserted here."""

import json
import subprocess
import sys


def test_crystal_train_with_no_options_learns_tiny_shakespeare(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crystal", "train"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("small-")
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert len(losses) == 2000
    assert sum(losses[-20:]) / 20 < 2.0
    assert [l["step"] for l in lines if "val_loss" in l] == list(range(250, 2001, 250))
    assert "saved model:" in proc.stdout
