"""`crystal train --eval-task FILE` (issue 32, item 5): a HellaSwag-format task scored during
training with the current weights (gpt2, llama, LoRA; one process or thread-ranks), written to
metrics.jsonl, the plain lines, live.json, TensorBoard and the summary; bitwise the training of a
run without it; kept by --print-config, TOML and --resume; bad task files refused up front."""

import dataclasses
import json
import threading

import numpy as np
import pytest
from test_bad_inputs import R, refused
from test_llama_model import llama_tiny

import crystal.trainer as trainer_module
from crystal.cli import main
from crystal.config import resolve
from crystal.data import ByteTokenizer, default_corpus
from crystal.lora import AdapterLayout, LoraConfig, merge
from crystal.model import GPT, ParamLayout, init_params
from crystal.tasks import load_task, score
from crystal.trainer import train

TEXT = default_corpus()[:20_000].decode()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """11 examples cut from the corpus (2 batches of scoring: 8 + 3), one context longer than the
    tiny preset's block size (32 bytes)."""
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    rng, words = np.random.default_rng(1), TEXT.split()
    with open(path, "w") as f:
        for i in range(11):
            at = int(rng.integers(len(words) - 50))
            n = 20 if i == 3 else int(rng.integers(2, 6))
            ends = [" ".join(words[at + n + 5 * k:at + n + 5 * k + int(rng.integers(1, 3))]) for k in range(4)]
            f.write(json.dumps({"ctx": " ".join(words[at:at + n]), "endings": ends,
                                "label": int(rng.integers(4))}) + "\n")
    return path


@pytest.fixture
def scored(monkeypatch):
    """Every TaskResult the trainer's score() returns during training, in order."""
    seen = []

    def spy(*args, **kw):
        seen.append(score(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(trainer_module, "score", spy)
    return seen


def reference(task, model_cfg, flat):
    """The task scored by a crystal.model.GPT holding `flat` (what `crystal eval --task` runs)."""
    return score(GPT(model_cfg, flat).token_losses, load_task(task, ByteTokenizer(), model_cfg.block_size))


def check_the_same_training(a, b):
    assert a.losses == b.losses and a.val_losses == b.val_losses
    assert a.params.tobytes() == b.params.tobytes()


@pytest.fixture(scope="module")
def plain_gpt2():
    return train(*resolve("tiny", train_overrides=dict(steps=4, spheres=3, eval_every=2, dropout=0.1)))


def test_gpt2_scored_while_training_is_bitwise_the_run_without(task, scored, plain_gpt2):
    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=4, spheres=3, eval_every=2, dropout=0.1,
                                                          eval_task=str(task)))
    r = train(model_cfg, cfg)
    check_the_same_training(r, plain_gpt2)
    assert [(t.step, t.task, t.task_examples) for t in r.tasks] == [(2, "task.jsonl", 11), (4, "task.jsonl", 11)]
    ref = reference(task, model_cfg, r.params)  # the last scoring had the final weights
    np.testing.assert_allclose(scored[-1].sum_losses, ref.sum_losses, rtol=1e-5)
    np.testing.assert_allclose(scored[-1].mean_losses, ref.mean_losses, rtol=1e-5)
    assert (r.tasks[-1].task_acc, r.tasks[-1].task_acc_norm) == (ref.acc, ref.acc_norm)
    assert not np.array_equal(scored[0].sum_losses, scored[-1].sum_losses)  # step 2's weights were others


def test_two_ranks_score_their_shares_and_agree_with_one_process(task, plain_gpt2):
    from thread_ranks import ThreadComm, run_ranks

    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=4, spheres=2, eval_every=2, dropout=0.1,
                                                          eval_task=str(task)))
    one = train(model_cfg, dataclasses.replace(cfg, spheres=3))
    shared = {"barrier": threading.Barrier(2)}
    out = run_ranks(2, lambda i: train(model_cfg, cfg, comm=ThreadComm(i, 2, shared)), shared)
    for r in out:
        check_the_same_training(r, plain_gpt2)
        assert r.tasks == one.tasks  # each rank scored one of the 2 batches; the hits summed


def test_llama_scored_every_step_is_bitwise_the_run_without(task, scored):
    model_cfg, cfg = llama_tiny(steps=2, spheres=2)
    plain = train(model_cfg, cfg)
    r = train(model_cfg, dataclasses.replace(cfg, eval_task=str(task), eval_task_every=1))
    check_the_same_training(r, plain)
    assert [t.step for t in r.tasks] == [1, 2]
    ref = reference(task, model_cfg, r.params)
    np.testing.assert_allclose(scored[-1].sum_losses, ref.sum_losses, rtol=1e-5)
    assert (r.tasks[-1].task_acc, r.tasks[-1].task_acc_norm) == (ref.acc, ref.acc_norm)


def test_lora_scores_with_its_adapters(task, scored):
    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=2, spheres=2, init_from="base", lora_r=2,
                                                          lora_targets="all", lr=0.05))
    base = init_params(model_cfg, 7)
    plain = train(model_cfg, cfg, init=base)
    r = train(model_cfg, dataclasses.replace(cfg, eval_task=str(task)), init=base)
    check_the_same_training(r, plain)
    assert [t.step for t in r.tasks] == [2]  # no --eval-every: the last step only
    merged = merge(AdapterLayout(model_cfg, LoraConfig.of(cfg, model_cfg)), ParamLayout(model_cfg), base, r.params)
    ref, without = reference(task, model_cfg, merged), reference(task, model_cfg, base)
    np.testing.assert_allclose(scored[-1].sum_losses, ref.sum_losses, rtol=1e-4)
    assert not np.allclose(ref.sum_losses, without.sum_losses, rtol=1e-4)  # the adapters count


def test_the_command_line_shows_logs_keeps_and_resumes_the_task(task, tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "4", "--spheres", "2", "--log-every", "100",
            "--eval-task", str(task), "--eval-task-every", "2"]
    assert main([*args, "--print-config"]) == 0
    toml = capsys.readouterr().out
    assert f"eval_task = {json.dumps(str(task))}" in toml and "eval_task_every = 2" in toml
    (tmp_path / "c.toml").write_text(toml)
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == toml  # the TOML round trip
    assert main([*args, "--checkpoint-every", "2", "--stop-at", "2", "--log", "tensorboard", "--out", str(run)]) == 0
    first = capsys.readouterr().out
    assert "step 2/4 | task.jsonl acc " in first and "(11 examples)" in first
    assert main(["train", "--resume", str(run)]) == 0
    rest = capsys.readouterr().out
    assert "step 4/4 | task.jsonl acc " in rest
    assert "task.jsonl: acc " in rest and "| 11 examples at step 4" in rest  # the summary
    assert json.loads((run / "train.json").read_text())["eval_task"] == str(task)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tasks = [r for r in recs if "task_acc" in r]
    assert [(t["step"], t["task"], t["task_examples"]) for t in tasks] == [(2, "task.jsonl", 11), (4, "task.jsonl", 11)]
    live = json.loads((run / "live.json").read_text())
    assert (live["task"], live["task_acc"], live["task_acc_norm"]) == ("task.jsonl", tasks[-1]["task_acc"],
                                                                       tasks[-1]["task_acc_norm"])
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("task_acc")] == [(2, float(np.float32(tasks[0]["task_acc"])))]


def test_the_live_view_shows_the_task(task):
    import io

    from rich.console import Console

    from crystal.dashboard import Snapshot, render

    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(Snapshot(steps=4, step=2, task="task.jsonl", task_acc=0.25, task_acc_norm=0.5)))
    text = console.export_text()
    assert "task.jsonl" in text and "acc 0.2500 | acc_norm 0.5000" in text


def test_bad_task_inputs_are_refused_before_training(task, tmp_path, capsys):
    (tmp_path / "three.jsonl").write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d"], "label": 0}) + "\n")
    (tmp_path / "long.jsonl").write_text(json.dumps({"ctx": "a", "endings": ["b" * 40, "c", "d", "e"],
                                                     "label": 0}) + "\n")
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, 3000
    (tmp_path / "shard.bin").write_bytes(header.tobytes() + (np.arange(3000) % 256).astype("<u2").tobytes())
    train_ = ["train", "--preset", "tiny", "--steps", "2", "--quiet", "--out", f"{R}/new"]
    for argv, says in [([*train_, "--eval-task", f"{R}/missing.jsonl"], "task file not found"),
                       ([*train_, "--eval-task", f"{R}/three.jsonl"], "line 1: endings must be a list of 4"),
                       ([*train_, "--eval-task", f"{R}/long.jsonl"], "more than the model's block size 32"),
                       ([*train_, "--eval-task-every", "2"], "--eval-task-every needs --eval-task"),
                       ([*train_, "--eval-task", str(task), "--eval-task-every", "0"], "positive integer"),
                       ([*train_, "--eval-task", str(task), "--data", f"{R}/shard.bin", "--vocab-size", "256"],
                        "names no tokenizer")]:
        assert says in refused(tmp_path, argv, capsys)[0]


def test_the_emulated_cuda_scorer_is_the_cpu_models_forward(tmp_path):
    """The scorer training calls (SphereSystem.scorer: the root thread's forward with the spheres'
    weights) on crystal.backends.cuda's host code and the CPU-emulated kernels (tests/emu), against
    the cpu GPT. A tiny model without training: emulated launches are slow."""
    from emu.backend import EmulatedCudaBackend

    from crystal.model import warm_up
    from crystal.reducer import GradientReducer
    from crystal.spheres import SphereSystem

    words = [w for w in TEXT.split() if len(w) < 7]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"ctx": " ".join(words[i:i + 3]), "endings": words[i + 3:i + 7],
                                        "label": i % 4}) + "\n" for i in range(0, 36, 4)))
    model_cfg, _ = resolve("tiny", dict(n_layer=1, n_head=2, n_embd=16, block_size=8))
    layout, be = ParamLayout(model_cfg), EmulatedCudaBackend()
    flat = init_params(model_cfg, 3)
    warm_up(be, model_cfg)
    with SphereSystem(be, model_cfg, layout, be.to_device(flat), GradientReducer(be, layout.size, 1), 1, 1, 8) as sp:
        got = score(sp.scorer(), load_task(path, ByteTokenizer(), 8))
    np.testing.assert_allclose(got.sum_losses, reference(path, model_cfg, flat).sum_losses, rtol=1e-4)
