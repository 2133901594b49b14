"""Runs over time: exact resume, evaluation during training, `crystal eval`, `crystal sample`."""

import json

import numpy as np
import pytest

from crystal.cli import main
from crystal.data import default_corpus, prepare

N = 6
TRAIN = ["train", "--preset", "tiny", "--spheres", "3", "--steps", str(2 * N), "--log-every", "100"]


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    (d / "input.txt").write_bytes(default_corpus()[:200_000])
    prepare([str(d / "input.txt")], str(d / "data"), "bpe", vocab_size=384, val_fraction=0.1)
    return d / "data"


def losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)]


@pytest.fixture(scope="module")
def straight_and_resumed(bpe_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = [*TRAIN, "--data", str(bpe_data), "--checkpoint-every", "2", "--eval-every", "3",
              "--eval-batches", "4"]
    assert main([*common, "--out", str(root / "straight")]) == 0
    assert main([*common, "--out", str(root / "resumed"), "--stop-at", str(N)]) == 0
    assert not (root / "resumed" / "model.safetensors").exists()
    assert main(["train", "--resume", str(root / "resumed")]) == 0
    return root / "straight", root / "resumed"


def test_a_resumed_run_ends_with_bitwise_identical_parameters(straight_and_resumed):
    a, b = straight_and_resumed
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_a_resumed_run_logs_bitwise_identical_losses(straight_and_resumed):
    a, b = straight_and_resumed
    assert losses(a) == losses(b) and len(losses(a)) == 2 * N


def test_only_the_newest_checkpoints_are_kept(straight_and_resumed):
    a, _ = straight_and_resumed
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000008", "step-00000010", "step-00000012"]
    assert (a / "checkpoints" / "latest").read_text().strip() == "step-00000012"


def test_resume_refuses_to_change_the_run_config(straight_and_resumed, capsys):
    _, b = straight_and_resumed
    assert main(["train", "--resume", str(b), "--lr", "0.1"]) == 2
    assert "cannot change --lr" in capsys.readouterr().err


def test_val_loss_is_logged_at_the_requested_interval(straight_and_resumed):
    a, _ = straight_and_resumed
    lines = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "val_loss" in l] == [3, 6, 9, 12]


def test_crystal_eval_agrees_with_the_last_logged_val_loss(straight_and_resumed, capsys):
    a, _ = straight_and_resumed
    last = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines() if "val_loss" in l][-1]
    capsys.readouterr()
    assert main(["eval", str(a)]) == 0
    out = capsys.readouterr().out
    assert f"val loss {last['val_loss']:.4f}" in out and "bits per byte" in out
    from crystal import load_checkpoint
    from crystal.checkpoint import read_train_config
    from crystal.data import load_dataset
    from crystal.trainer import evaluate

    cfg = read_train_config(a / "train.json")
    loss, n = evaluate(load_checkpoint(a), load_dataset(cfg.data, cfg.val_fraction), cfg)
    assert loss == last["val_loss"] and n == 4


def test_val_loss_is_printed_during_training(bpe_data, tmp_path, capsys):
    assert main([*TRAIN, "--data", str(bpe_data), "--eval-every", "4", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert [l.split()[1] for l in out.splitlines() if "val loss" in l and l.startswith("step")] == \
        ["4/12", "8/12", "12/12"]


def test_sample_with_the_same_seed_prints_the_same_text(straight_and_resumed, capsys):
    a, _ = straight_and_resumed
    args = ["sample", str(a), "--prompt", "ROMEO:", "--tokens", "30", "--seed", "7", "--top-k", "20"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:")
    assert main([*args[:-4], "--seed", "8"]) == 0
    assert capsys.readouterr().out != first


def test_greedy_sampling_follows_the_argmax(straight_and_resumed):
    from crystal import load_checkpoint
    from crystal.sample import generate

    a, _ = straight_and_resumed
    model = load_checkpoint(a)
    ids = generate(model, [5, 6, 7], 4, temperature=0)
    for i in range(3, 7):
        assert ids[i] == int(np.argmax(model.logits(np.array([ids[:i]]))[0, -1]))


# --- run directories and their data (issue 21) ---
def file_hashes(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_says_so_and_changes_nothing(straight_and_resumed, capsys):
    straight, _ = straight_and_resumed
    before = file_hashes(straight)
    capsys.readouterr()
    assert main(["train", "--resume", str(straight)]) == 0
    assert f"{straight} is finished (step {2 * N} of {2 * N}); nothing to resume" in capsys.readouterr().out
    assert file_hashes(straight) == before


def test_train_json_keeps_the_absolute_data_path_and_the_tokens_hash(tmp_path, monkeypatch):
    from crystal.data import load_dataset

    (tmp_path / "input.txt").write_bytes(default_corpus()[:50_000])
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--checkpoint-every", "1", "--stop-at", "1",
                 "--quiet", "--data", "input.txt", "--out", "run"]) == 0
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert saved["data"] == str(tmp_path / "input.txt")
    assert saved["data_sha256"] == load_dataset(str(tmp_path / "input.txt")).sha256
    monkeypatch.chdir("/")  # resumed from anywhere, it finds its data
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0


def test_changed_data_is_reported_on_resume_and_by_eval(tmp_path, capsys):
    data = tmp_path / "input.txt"
    data.write_bytes(default_corpus()[:50_000])
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--checkpoint-every", "1", "--stop-at", "1",
                 "--quiet", "--data", str(data), "--out", str(run)]) == 0
    data.write_bytes(default_corpus()[50_000:100_000])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "changed since" in err
    assert main(["eval", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "changed since" in err


def test_overwrite_clears_the_old_run_once_the_new_one_starts(tmp_path):
    run = tmp_path / "run"
    common = ["train", "--preset", "tiny", "--quiet", "--out", str(run)]
    assert main([*common, "--steps", "4", "--checkpoint-every", "2"]) == 0
    assert (run / "checkpoints").exists() and (run / "model.safetensors").exists()
    assert main([*common, "--steps", "3", "--overwrite", "--stop-at", "1", "--checkpoint-every", "1"]) == 0
    assert not (run / "model.safetensors").exists()  # the old run's model is gone, not left beside a new config
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000001"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_no_memory_check_starts_a_run_the_estimate_says_does_not_fit(tmp_path, monkeypatch, capsys):
    import crystal.memory

    monkeypatch.setattr(crystal.memory, "available_bytes", lambda device: 1024)
    common = ["train", "--preset", "tiny", "--steps", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    assert "GiB (the --dry-run estimate)" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*common, "--out", str(tmp_path / "b"), "--no-memory-check"]) == 0
