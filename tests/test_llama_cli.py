"""`crystal train --arch llama` through the command line, as GPT-2 runs are tested: a stopped and
resumed run is bitwise the straight one; one run exercises what a GPT-2 run has (evaluation
during training, metrics.jsonl, TensorBoard, the plain progress lines, `crystal eval`, `crystal
plot`, the --dry-run memory figures and the memory guard); `crystal export --format hf` refuses
a llama that transformers' LlamaConfig cannot hold. (2 ranks under mpiexec: tests/test_mpi.py.)"""

import importlib.util
import json

import numpy as np
import pytest

from crystal.cli import main
from crystal.config import resolve
from test_bad_inputs import R, refused

# 2 layers, 4 heads on 2 KV heads, 32 wide (head 8), SwiGLU 128, untied, on the embedded corpus
LLAMA = ["train", "--preset", "tiny", "--device", "cpu", "--arch", "llama", "--n-head", "4", "--n-kv-head", "2",
         "--no-tie-word-embeddings", "--dropout", "0.1", "--spheres", "3", "--micro-batches", "3", "--steps", "6",
         "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "2"]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed", "ms_per_step", "tokens_per_s")} for r in recs]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The straight run, with TensorBoard logs and its plain progress lines (stdout is no tty)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("llama") / "straight"
    log = ["--log", "tensorboard"] if _has_tensorboard() else []
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main([*LLAMA, "--log-every", "2", *log, "--out", str(out)]) == 0
    return out, text.getvalue()


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _has_tensorboard() -> bool:
    return _has("tensorboard", "tensorboardX")  # the reader, the writer (the tensorboard extra)


def test_a_stopped_and_resumed_llama_run_is_bitwise_the_straight_run(straight, tmp_path):
    a, _ = straight
    b = tmp_path / "resumed"
    assert main([*LLAMA, "--quiet", "--stop-at", "3", "--out", str(b)]) == 0
    assert not (b / "model.safetensors").exists()
    assert main(["train", "--resume", str(b), "--quiet"]) == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert without_timing(records(a)) == without_timing(records(b))


def test_a_llama_run_has_what_a_gpt2_run_has(straight, tmp_path, capsys, monkeypatch):
    run, text = straight
    # metrics.jsonl: a loss every step, a val loss every --eval-every steps; the plain lines
    recs = records(run)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6]
    lines = text.splitlines()
    assert lines[0].startswith("crystal: preset tiny (llama: 2 layers, 4 heads on 2 KV heads, 32 wide")
    assert [line.split()[1] for line in lines if line.startswith("step ") and "| loss" in line] == \
        ["1/6", "2/6", "4/6", "6/6"]
    assert f"step 6/6 | val loss {vals[-1]['val_loss']:.4f}" in lines and "\x1b[" not in text
    # crystal eval: the last logged val loss
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert f"val loss {vals[-1]['val_loss']:.4f}" in capsys.readouterr().out
    # TensorBoard: the metrics' scalars, read back by tensorboard's reader
    if _has_tensorboard():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == \
            [(r["step"], float(np.float32(r["val_loss"]))) for r in vals]
    # crystal plot
    if _has("matplotlib"):
        assert main(["plot", str(run), "--out", str(tmp_path / "plot.png")]) == 0
        assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --dry-run: the llama's memory figures; the guard refuses a run they say does not fit
    import crystal.memory

    model, cfg = resolve("tiny", dict(arch="llama", n_head=4, n_kv_head=2, tie_word_embeddings=False),
                         dict(dropout=0.1, spheres=3, micro_batches=3, steps=6, device="cpu"))
    total = crystal.memory.run_estimate(model, cfg)["total"]
    capsys.readouterr()
    assert main([*LLAMA, "--dry-run"]) == 0
    assert f"total {total / 2**20:,.1f} MiB" in capsys.readouterr().out
    monkeypatch.setattr(crystal.memory, "available_bytes", lambda device: total - 1)
    lines = refused(tmp_path, [*LLAMA, "--quiet", "--out", f"{R}/guarded"], capsys)
    assert "(the --dry-run estimate)" in lines[0]


def test_export_hf_refuses_a_llama_whose_width_its_heads_do_not_divide(tmp_path, capsys):
    """transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with head_dim
    (crystal trains such a model; a Qwen2 shape, with q/k/v biases, exports)."""
    run = tmp_path / "run"
    shape = ["--arch", "llama", "--n-embd", "36", "--n-head", "8", "--head-dim", "8", "--n-kv-head", "2"]
    assert main(["train", "--preset", "tiny", *shape, "--steps", "1", "--spheres", "1", "--quiet", "--out",
                 str(run)]) == 0
    lines = refused(tmp_path, ["export", f"{R}/run", "--format", "hf", "--out", f"{R}/hf"], capsys)
    assert "hidden_size (36) divisible by num_attention_heads (8)" in lines[0]
    assert not (tmp_path / "hf").exists()
