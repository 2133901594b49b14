"""Multi-process runs under mpiexec (the `mpi` extra: mpi4py + the mpich wheel): bitwise equal to
one process with the sharded optimizer (the default) and without it, a killed rank ends the run,
a 2-rank run resumes exactly, under 2, 4 or 1 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on the PATH")

TINY = ["train", "--preset", "tiny", "--device", "cpu", "--quiet", "--micro-batches", "12"]
# the sharded AdamW (ZeRO-1) on the small preset's buffer: --optimizer adamw, not the preset's Muon
SMALL = ["train", "--preset", "small", "--device", "cpu", "--quiet", "--optimizer", "adamw", "--micro-batches", "12",
         "--steps", "6", "--eval-every", "3", "--eval-batches", "4"]
DROPOUT = [*TINY, "--dropout", "0.2", "--steps", "8", "--eval-every", "4"]


def crystal(*args) -> list[str]:
    return [sys.executable, "-m", "crystal.cli", *args]


def clean_env() -> dict:
    """This test's environment without launcher variables from an outer launcher."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE")}


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def mpirun(n: int, *args, timeout=300) -> subprocess.CompletedProcess:
    return run([MPIEXEC, "-n", str(n), *crystal(*args)], timeout)


def steps(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in ("elapsed", "ms_per_step", "tokens_per_s"):
            rec.pop(k, None)
        out.append(rec)
    return out


def start_long_run(out: Path, *extra) -> subprocess.Popen:
    """A 2-rank run that would take hours, returned once it has logged 3 steps."""
    proc = subprocess.Popen([MPIEXEC, "-n", "2", *crystal(*TINY, "--spheres", "1", "--steps", "100000",
                                                          "--out", str(out), *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(steps(out)) < 3:  # training is under way
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate())
        time.sleep(0.1)
    return proc


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference run."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(crystal(*TINY, "--spheres", "1", "--steps", "24", "--eval-every", "12", "--out", str(out)))
    return out


def same_run(a: Path, b: Path) -> bool:
    """Every metrics line (timing aside) and the model's bytes are equal."""
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes() and steps(a) == steps(b)


@pytest.mark.parametrize("ranks, spheres, shard", [(2, 1, "--shard-optimizer"), (4, 2, "--shard-optimizer"),
                                                   (2, 1, "--no-shard-optimizer"), (4, 2, "--no-shard-optimizer")])
def test_ranks_give_bitwise_the_single_process_run(single, tmp_path, ranks, spheres, shard):
    out = tmp_path / "run"
    mpirun(ranks, *TINY, "--spheres", str(spheres), "--steps", "24", "--eval-every", "12", shard, "--out", str(out))
    assert same_run(out, single)
    root = json.loads((out / "spheres.json").read_text())["root"]
    assert root["shard_optimizer"] == (shard == "--shard-optimizer") and root["comm_bytes_per_step"] > 0


@pytest.fixture(scope="module")
def single_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("single-small") / "run"
    run(crystal(*SMALL, "--spheres", "1", "--out", str(out)))
    return out


@pytest.mark.parametrize("ranks, spheres", [(2, 1), (4, 2)])
def test_sharded_ranks_on_the_small_preset_give_bitwise_the_single_process_run(single_small, tmp_path, ranks, spheres):
    out = tmp_path / "run"
    mpirun(ranks, *SMALL, "--spheres", str(spheres), "--shard-optimizer", "--out", str(out))
    assert same_run(out, single_small)


def test_sharded_ranks_with_dropout_give_bitwise_the_single_process_run(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    run(crystal(*DROPOUT, "--spheres", "1", "--out", str(one)))
    mpirun(4, *DROPOUT, "--spheres", "2", "--shard-optimizer", "--out", str(four))
    assert same_run(four, one)


def test_a_sharded_two_rank_run_resumes_bitwise_under_four_ranks_and_under_one_process(single, tmp_path):
    stopped = tmp_path / "stopped"
    mpirun(2, *TINY, "--spheres", "1", "--steps", "24", "--eval-every", "12", "--checkpoint-every", "5",
           "--stop-at", "10", "--shard-optimizer", "--out", str(stopped))
    assert not (stopped / "model.safetensors").exists()
    four, one = tmp_path / "four", tmp_path / "one"
    shutil.copytree(stopped, four)
    shutil.copytree(stopped, one)
    mpirun(4, "train", "--resume", str(four), "--quiet")
    run(crystal("train", "--resume", str(one), "--quiet"))
    assert same_run(four, single) and same_run(one, single)


@pytest.mark.parametrize("ranks, shard", [(2, "--no-shard-optimizer"), (4, "--shard-optimizer")])
def test_muon_on_ranks_gives_bitwise_the_single_process_run(tmp_path, ranks, shard):
    muon = [*TINY, "--optimizer", "muon", "--steps", "6"]
    one, many = tmp_path / "one", tmp_path / "many"
    run(crystal(*muon, "--spheres", "1", "--out", str(one)))
    mpirun(ranks, *muon, "--spheres", "1", shard, "--out", str(many))
    assert same_run(many, one)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Chat records prepared with `crystal prepare --format chat` (a byte-level BPE of 300 tokens
    and a chat template): a loss mask whose long prompts leave 16-token windows without a target."""
    pytest.importorskip("jinja2")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from crystal.cli import main
    from crystal.data import EOT, default_corpus

    root = tmp_path_factory.mktemp("chat")
    text = default_corpus()[:20_000].decode()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    bpe.save(str(root / "tok" / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT, "chat_template": template}))
    lines = [s for s in text.split("\n") if len(s) > 20]
    records = [{"messages": [{"role": "user", "content": " ".join(lines[3 * i:3 * i + 1 + i % 3])},
                             {"role": "assistant", "content": lines[3 * i + 2][:12 + 7 * (i % 4)]}]}
               for i in range(60)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["prepare", str(root / "chat.jsonl"), "--format", "chat", "--tokenizer", str(root / "tok"),
                 "--out", str(root / "data"), "--val-fraction", "0.2"]) == 0
    return root / "data"


def test_ranks_on_masked_instruction_data_give_bitwise_the_single_process_run(chat_data, tmp_path):
    """The loss is the mean over the step's unmasked targets, counted over every rank's
    micro-batches (one with none adds zero): 2 ranks of 2 spheres, with the sharded optimizer, are
    bitwise 1 process of 1 sphere, val loss included."""
    from crystal.data import BatchIterator, load_dataset

    masked = ["train", "--preset", "tiny", "--device", "cpu", "--quiet", "--data", str(chat_data), "--seq-len", "16",
              "--micro-batches", "6", "--steps", "4", "--eval-every", "2", "--eval-batches", "4"]
    ds = load_dataset(str(chat_data))
    batches = BatchIterator(ds.train, 2, 16, 1337, mask=ds.train_mask)  # tiny's batch size and seed
    counts = [int((batches.next_batch()[1] >= 0).sum()) for _ in range(6)]  # the first step's micro-batches
    assert 0 in counts and len(set(counts)) > 2 and sum(counts) < 6 * 2 * 16, counts  # [0, 17, 0, 16, 0, 3]
    one, two = tmp_path / "one", tmp_path / "two"
    run(crystal(*masked, "--spheres", "1", "--out", str(one)))
    mpirun(2, *masked, "--spheres", "2", "--shard-optimizer", "--out", str(two))
    assert same_run(two, one) and any("val_loss" in s for s in steps(one))
    assert json.loads((two / "spheres.json").read_text())["root"]["ranks"] == 2


def test_only_rank_zero_prints_and_writes(tmp_path):
    out = tmp_path / "run"
    done = mpirun(2, *TINY, "--spheres", "1", "--steps", "4", "--out", str(out))
    assert done.stdout.count("saved model:") == 1
    assert json.loads((out / "spheres.json").read_text())["root"]["ranks"] == 2


def test_resume_of_a_two_rank_run_equals_the_uninterrupted_run(single, tmp_path):
    out = tmp_path / "run"
    mpirun(2, *TINY, "--spheres", "1", "--steps", "24", "--eval-every", "12", "--checkpoint-every", "5",
           "--stop-at", "10", "--out", str(out))
    assert not (out / "model.safetensors").exists()
    mpirun(2, "train", "--resume", str(out), "--quiet")
    assert same_run(out, single)


def rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the running crystal processes whose command line holds marker."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if "PMI_RANK" in env and "crystal.cli" in (proc / "cmdline").read_bytes().decode(errors="replace"):
            found[int(env["PMI_RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's pid")
def test_a_killed_rank_ends_the_run_within_60_seconds(tmp_path):
    out = tmp_path / "killed-run"
    proc = start_long_run(out)
    try:
        pids = rank_pids(str(out))
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 60
        assert "BAD TERMINATION" in stdout + stderr or "no answer from the other ranks" in stderr
    finally:
        finish(proc)


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")  # rank 0 refuses to overwrite; rank 1 has no run dir
    done = subprocess.run([MPIEXEC, "-n", "2", *crystal(*TINY, "--steps", "4", "--out", str(out))],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert done.returncode != 0
    assert f"error: rank 0: --out {out} already holds a run" in done.stderr


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's pid")
def test_a_hung_rank_is_caught_by_the_watchdog_of_the_others(tmp_path):
    out = tmp_path / "hung-run"
    proc = start_long_run(out, "--comm-timeout", "3")
    try:
        os.kill(rank_pids(str(out))[1], signal.SIGSTOP)  # alive, but never answers again
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0 and time.monotonic() - t0 < 60
        assert "error: rank 0: no answer from the other ranks for 3 s" in stderr
    finally:
        finish(proc)


def test_sigint_to_mpiexec_stops_every_rank_after_one_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "interrupted"
    proc = start_long_run(out)
    try:
        proc.send_signal(signal.SIGINT)  # mpiexec passes it on to every rank
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "continue with: crystal train --resume" in stderr
        assert len(list((out / "checkpoints").glob("step-*"))) == 1
    finally:
        finish(proc)


def test_ranks_started_with_different_configs_refuse_to_train(tmp_path):
    out = tmp_path / "mixed"
    one = crystal(*TINY, "--steps", "4", "--out", str(out))
    done = subprocess.run([MPIEXEC, "-n", "1", *one, "--seed", "1", ":", "-n", "1", *one, "--seed", "2"],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert done.returncode != 0
    assert "ranks disagree on the run" in done.stderr
    assert not (out / "model.safetensors").exists()


LLAMA = [*TINY, "--arch", "llama", "--n-head", "4", "--n-kv-head", "2", "--no-tie-word-embeddings", "--dropout", "0.1",
         "--steps", "4", "--eval-every", "2", "--eval-batches", "2"]


def test_a_llama_on_two_sharded_ranks_is_bitwise_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(crystal(*LLAMA, "--spheres", "1", "--out", str(one)))
    mpirun(2, *LLAMA, "--spheres", "2", "--shard-optimizer", "--out", str(two))
    assert same_run(two, one)
    root = json.loads((two / "spheres.json").read_text())["root"]
    assert root["ranks"] == 2 and root["shard_optimizer"]
    assert json.loads((two / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_lora_run_on_two_sharded_ranks_is_bitwise_the_single_process_run(single, tmp_path):
    """LoRA (crystal.lora) on the reference run's frozen model, adapters on every GPT-2 projection with
    dropout: 2 ranks with the sharded optimizer (over the adapter buffer) give the one-process
    run's adapters and metrics bit for bit, and leave the base's bytes alone."""
    lora = ["train", "--preset", "tiny", "--device", "cpu", "--quiet", "--init-from", str(single), "--lora-r", "4",
            "--lora-targets", "all", "--lora-dropout", "0.1", "--micro-batches", "4", "--spheres", "1", "--steps",
            "4", "--eval-every", "2", "--eval-batches", "2"]
    base = (single / "model.safetensors").read_bytes()
    one, two = tmp_path / "one", tmp_path / "two"
    run(crystal(*lora, "--out", str(one)))
    mpirun(2, *lora, "--shard-optimizer", "--out", str(two))
    assert (two / "adapter_model.safetensors").read_bytes() == (one / "adapter_model.safetensors").read_bytes()
    assert steps(two) == steps(one) and len(steps(one)) >= 4
    root = json.loads((two / "spheres.json").read_text())["root"]
    assert root["ranks"] == 2 and root["shard_optimizer"] and root["comm_bytes_per_step"] > 0
    assert (single / "model.safetensors").read_bytes() == base
