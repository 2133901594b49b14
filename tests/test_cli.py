"""`crystal train` end to end: the run directory, the report, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import crystal
from crystal.cli import main
from crystal.config import ModelConfig
from crystal.model import param_shapes

TINY = ["train", "--preset", "tiny", "--steps", "6", "--log-every", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "crystal", *TINY, "--spheres", "12", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_train_writes_the_run_directory(tiny_run):
    out, _ = tiny_run
    assert {p.name for p in out.iterdir()} == {
        "config.json", "train.json", "tokenizer.json", "metrics.jsonl", "spheres.json", "model.safetensors",
        "live.json", ".crystal.lock"}


def test_model_safetensors_holds_exactly_the_hf_gpt2_tensors(tiny_run):
    out, _ = tiny_run
    cfg = ModelConfig.from_hf(json.loads((out / "config.json").read_text()))
    expected = dict(param_shapes(cfg))
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert all(f.get_tensor(k).dtype == np.float32 for k in f.keys())
    assert found == expected
    assert "transformer.h.1.mlp.c_fc.weight" in found and "lm_head.weight" not in found


def test_config_json_has_the_hf_gpt2config_fields(tiny_run):
    out, _ = tiny_run
    c = json.loads((out / "config.json").read_text())
    assert c["model_type"] == "gpt2" and c["activation_function"] == "gelu_new"
    assert c["tie_word_embeddings"] is True and c["layer_norm_epsilon"] == 1e-5
    assert (c["vocab_size"], c["n_positions"], c["n_embd"], c["n_layer"], c["n_head"]) == (256, 32, 32, 2, 2)


def test_metrics_jsonl_has_one_line_per_step(tiny_run):
    out, _ = tiny_run
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step", "elapsed"} <= set(lines[0])


def test_spheres_json_reports_every_sphere_and_the_root(tiny_run):
    out, _ = tiny_run
    s = json.loads((out / "spheres.json").read_text())
    assert len(s["spheres"]) == 12 and all(x["batches"] == 6 for x in s["spheres"])
    assert s["root"]["active_spheres"] == 12 and s["root"]["grad_norm"] > 0


def test_progress_lines_and_final_report_are_printed(tiny_run):
    out, stdout = tiny_run
    steps = [l for l in stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["1/6", "2/6", "4/6", "6/6"]
    assert all("loss" in l and "tok/s" in l and "ms/step" in l for l in steps)
    table = stdout[stdout.index("sphere  batches"):]
    assert len([l for l in table.splitlines() if l.split() and l.split()[0].isdigit()]) == 12
    assert "active spheres 12/12" in stdout and "total grad norm" in stdout
    assert f"saved model: {out / 'model.safetensors'}" in stdout
    assert "\x1b[" not in stdout


def test_load_checkpoint_gives_the_trained_model(tiny_run):
    out, _ = tiny_run
    model = crystal.load_checkpoint(out)
    assert model.config.n_layer == 2 and model.params["transformer.wte.weight"].shape == (256, 32)
    idx = np.array([[70, 105, 114, 115, 116]])
    logits = model.logits(idx)
    assert logits.shape == (1, 5, 256) and logits.dtype == np.float32
    loss, grads = model.loss_and_grads(idx, np.array([[105, 114, 115, 116, 32]]))
    assert 0 < loss < 10 and grads.keys() == model.params.keys()
    same = crystal.load_checkpoint(out / "model.safetensors")
    np.testing.assert_array_equal(same.logits(idx), logits)


def test_one_and_twelve_spheres_write_identical_models(tmp_path, tiny_run):
    out, _ = tiny_run
    assert main([*TINY, "--spheres", "1", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_an_existing_run_is_not_overwritten(tiny_run, capsys):
    out, _ = tiny_run
    before = (out / "model.safetensors").read_bytes()
    assert main([*TINY, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


BAD_INPUTS = {  # name: (flags, a word the one-line error must contain); {tmp} is a fresh folder
    "missing data file": (["--data", "{tmp}/missing.txt"], "not found"),
    "empty data file": (["--data", "{tmp}/empty.txt"], "empty"),
    "data shorter than one batch": (["--data", "{tmp}/short.txt"], "needs at least"),
    "data is a directory": (["--data", "{tmp}"], "directory"),
    "zero spheres": (["--spheres", "0"], "--spheres"),
    "too many spheres": (["--spheres", "65"], "--spheres"),
    "spheres not a number": (["--spheres", "many"], "--spheres"),
    "n_embd not divisible by n_head": (["--n-embd", "30", "--n-head", "4"], "divisible"),
    "seq_len above block_size": (["--seq-len", "64", "--block-size", "32"], "--block-size"),
    "zero steps": (["--steps", "0"], "--steps"),
    "negative steps": (["--steps", "-3"], "--steps"),
    "zero lr": (["--lr", "0"], "--lr"),
    "negative lr": (["--lr", "-1e-3"], "--lr"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "zero batch size": (["--batch-size", "0"], "--batch-size"),
    "zero micro-batches": (["--micro-batches", "0"], "--micro-batches"),
    "unknown preset": (["--preset", "huge"], "preset"),
    "unknown device": (["--device", "tpu"], "--device"),
    "cuda without a GPU": (["--device", "cuda"], "cuda"),
    "negative warmup": (["--warmup", "-1"], "--warmup"),
    "unknown option": (["--bogus"], "bogus"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    if case == "cuda without a GPU":
        from crystal.backends import cuda_unavailable_reason
        if cuda_unavailable_reason() is None:
            pytest.skip("a usable GPU is present")
    (tmp_path / "short.txt").write_bytes(b"too short")
    (tmp_path / "empty.txt").write_bytes(b"")
    flags, needle = BAD_INPUTS[case]
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--out", str(out), *(f.format(tmp=tmp_path) for f in flags)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (out / "model.safetensors").exists()


def test_bad_input_from_the_installed_command_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crystal", "train", "--spheres", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --spheres must be between 1 and 64, got 0"


def test_device_auto_without_a_gpu_trains_on_the_cpu_and_says_so(tmp_path, capsys):
    from crystal.backends import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a usable GPU is present")
    argv = ["train", "--preset", "tiny", "--steps", "2", "--device", "auto", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "device auto: training on cpu (" in out and " on cpu with " in out


def test_bf16_with_device_auto_and_no_gpu_exits_2_naming_the_reason(tmp_path, capsys):
    from crystal.backends import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is present: auto picks cuda")
    assert main(["train", "--preset", "tiny", "--precision", "bf16", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16" in err[0] and "GPU" in err[0]
    assert not (tmp_path / "r").exists()


def test_dry_run_of_the_gpt2_preset_in_bf16_counts_the_weight_copy_and_bf16_activations(capsys):
    assert main(["train", "--preset", "gpt2", "--precision", "bf16", "--device", "cuda", "--dry-run"]) == 0
    bf16 = capsys.readouterr().out
    assert main(["train", "--preset", "gpt2", "--device", "cuda", "--dry-run"]) == 0
    fp32 = capsys.readouterr().out
    assert "bf16 weights" in bf16 and "bf16 weights" not in fp32
    assert "parameters: 86,039,040" in bf16  # GPT-2 124M shapes with the byte vocabulary (256)

    def total(text):
        return float(text.rsplit("total ", 1)[1].split(" MiB")[0].replace(",", ""))

    assert total(bf16) < 0.7 * total(fp32)


def test_a_tiny_temperature_samples_as_greedy(tiny_run, capsys):
    out, _ = tiny_run
    args = ["sample", str(out), "--prompt", "ROMEO:", "--tokens", "30", "--temperature"]
    assert main([*args, "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "1e-320"]) == 0  # (logits - max) / t: -inf but for the argmax, never NaN
    assert capsys.readouterr().out == greedy


def test_a_bpe_runs_safetensors_file_samples_and_exports_with_the_tokenizer_beside_it(tmp_path, capsys):
    from crystal.data import default_corpus, prepare

    (tmp_path / "input.txt").write_bytes(default_corpus()[:60_000])
    prepare([str(tmp_path / "input.txt")], str(tmp_path / "bpe"), "bpe", vocab_size=300)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--spheres", "1", "--quiet", "--data",
                 str(tmp_path / "bpe"), "--out", str(run)]) == 0
    capsys.readouterr()
    texts = []
    for path in (run, run / "model.safetensors"):
        assert main(["sample", str(path), "--tokens", "300", "--seed", "3"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    (tmp_path / "empty").mkdir()  # an empty --out is taken
    assert main(["export", str(run / "model.safetensors"), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


def test_a_failed_export_leaves_no_directory(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    (run / "tokenizer.json").write_text("{}")
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("value", ["a\nb", "\r0", "x\x1b[2Jy"])
def test_an_error_naming_a_value_with_control_characters_is_still_one_line(value, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / value), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "\x1b" not in err
