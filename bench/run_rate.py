"""The training rate of a finished `crystal train` run directory, for the bench scripts."""

from __future__ import annotations

import json
from pathlib import Path


def rate_after(run: Path, warmup: int) -> tuple[float, float]:
    """(tokens/s, ms/step) over the steps after the first `warmup`, from metrics.jsonl and train.json."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and "elapsed" in r]
    a, b = recs[warmup - 1], recs[-1]
    train = json.loads((run / "train.json").read_text())
    tokens_per_step = train["micro_batches"] * train["batch_size"] * train["seq_len"]
    seconds, steps = b["elapsed"] - a["elapsed"], b["step"] - a["step"]
    return tokens_per_step * steps / seconds, 1e3 * seconds / steps
