"""Fine-tuning released GPT-2 checkpoints: `crystal prepare --tokenizer DIR`, `crystal train
--init-from DIR`, and the way back to transformers.

The released model is played by a tiny random GPT-2 (odd sizes: 36 wide, 3 heads, 2 layers,
n_positions 40) that transformers builds and saves here the ways a user may have one (one file,
shards, GPT2Model names, float16, bfloat16, pickle only), with a byte-level BPE tokenizer trained
here. Nothing comes from the Hugging Face hub.
"""

import copy
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crystal import load_checkpoint
from crystal.backends.cpu import CpuBackend
from crystal.cli import main
from crystal.config import PRESETS, ModelConfig, read_toml
from crystal.data import EOT, default_corpus, read_tokens
from crystal.model import ParamLayout, param_shapes
from compare import rel_err

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(n_positions=40, n_embd=36, n_layer=2, n_head=3)
PROMPT = "ROMEO:"


def train_tokenizer(text: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The tiny GPT-2, saved as transformers saves it, in every variant; its tokenizer beside."""
    root = tmp_path_factory.mktemp("gpt2")
    text = default_corpus()[:100_000].decode()
    (root / "input.txt").write_text(text, encoding="utf-8")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text), eos_token=EOT,
                                               bos_token=EOT)
    cfg = transformers.GPT2Config(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, **SHAPE)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # every tensor unlike any initialization (no zero biases, no unit norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)

    def save(name, m, **kw):
        m.save_pretrained(root / name, **kw)
        tok.save_pretrained(root / name)
        return root / name

    save("hf", model)
    save("sharded", model, max_shard_size="50KB")
    save("gpt2model", model.transformer)  # names without the `transformer.` prefix
    save("float16", copy.deepcopy(model).half())
    save("bfloat16", copy.deepcopy(model).to(torch.bfloat16))
    pickled = save("pickle", model)  # what safe_serialization=False wrote: a pickled state dict only
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(root / "hf")]) == 0
    return root


def stored_flat(directory: Path) -> np.ndarray:
    """The checkpoint's tensors as transformers stored them, in crystal's flat buffer (float32,
    the LM head's padding rows zero)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            tensors[k if k.startswith("transformer.") else "transformer." + k] = v.float().numpy()
    cfg = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    return ParamLayout(cfg).padded(np.concatenate([tensors[name].reshape(-1) for name, _ in param_shapes(cfg)]))


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def torch_model(directory):
    return transformers.GPT2LMHeadModel.from_pretrained(str(directory), local_files_only=True).eval()


def val_batch(gpt2, rows=4):
    """Windows of the prepared validation split: [rows, 40] inputs and their targets."""
    ids, _ = read_tokens(gpt2 / "data" / "val.bin")
    w = np.stack([ids[i * 41:(i + 1) * 41] for i in range(rows)]).astype(np.int64)
    return w[:, :-1], w[:, 1:]


def hf_loss(model, x, y) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(x)).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1)).item()


class RecordingBackend(CpuBackend):
    """The cpu backend, keeping a copy of every parameter-sized buffer sent to it: the first is
    what training starts from."""

    def __init__(self, n_params: int):
        super().__init__()
        self.n_params, self.sent = n_params, []

    def to_device(self, host_array):
        if np.shape(host_array) == (self.n_params,):
            self.sent.append(np.array(host_array, copy=True))
        return super().to_device(host_array)


def train_recording(argv: list[str], n_params: int) -> np.ndarray:
    """Run `crystal train argv` on a recording backend; the parameters it started from."""
    be = RecordingBackend(n_params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("crystal.backends.get_backend", lambda *a, **k: be)
        assert main(["train", *argv]) == 0
    return be.sent[0]


@pytest.fixture(scope="module")
def finetuned(gpt2):
    """20 steps of the finetune preset from the single-file checkpoint, exported for transformers."""
    n = ParamLayout(load_checkpoint(gpt2 / "hf").config).size
    run, out = gpt2 / "run", gpt2 / "export"
    start = train_recording(["--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--steps", "20",
                             "--quiet", "--out", str(run)], n)
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    return SimpleNamespace(run=run, export=out, start=start)


# --- reading a released checkpoint ---------------------------------------------------------------

def test_crystals_loss_equals_transformers_loss_right_after_loading(gpt2):
    x, y = val_batch(gpt2)
    ours = load_checkpoint(gpt2 / "hf").loss(x, y)
    assert rel_err(ours, hf_loss(torch_model(gpt2 / "hf"), x, y)) <= 1e-5


def test_the_loaded_parameters_are_bitwise_the_stored_tensors(gpt2):
    assert np.array_equal(bits(load_checkpoint(gpt2 / "hf").flat), bits(stored_flat(gpt2 / "hf")))


@pytest.mark.parametrize("variant", ["sharded", "gpt2model"])
def test_shards_and_names_without_the_transformer_prefix_load_the_same_parameters(gpt2, variant):
    assert np.array_equal(bits(load_checkpoint(gpt2 / variant).flat), bits(load_checkpoint(gpt2 / "hf").flat))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tensors_are_widened_to_float32_exactly(gpt2, dtype):
    assert np.array_equal(bits(load_checkpoint(gpt2 / dtype).flat), bits(stored_flat(gpt2 / dtype)))


def test_training_from_half_precision_says_it_widened_the_tensors(gpt2, tmp_path, capsys):
    assert main(["train", "--init-from", str(gpt2 / "bfloat16"), "--data", str(gpt2 / "data"), "--steps", "1",
                 "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert "widened bfloat16 to float32 (exact)" in capsys.readouterr().out


def test_mask_buffers_and_a_saved_copy_of_the_tied_head_are_accepted(gpt2, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "with-head"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((gpt2 / "hf" / f).read_bytes())
    t = load_file(str(gpt2 / "hf" / "model.safetensors"))
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    t["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 40, 40), np.float32))  # older transformers' buffers
    t["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(t, str(d / "model.safetensors"))
    assert np.array_equal(bits(load_checkpoint(d).flat), bits(load_checkpoint(gpt2 / "hf").flat))


def test_a_pickle_only_directory_is_refused_with_the_command_that_converts_it(gpt2, tmp_path, capsys):
    argv = ["train", "--init-from", str(gpt2 / "pickle"), "--data", str(gpt2 / "data"), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pytorch_model.bin" in err and "never loads" in err
    assert f"from_pretrained('{gpt2 / 'pickle'}').save_pretrained('{gpt2 / 'pickle'}', safe_serialization=True)" in err


def test_data_in_another_tokenizer_is_refused_with_the_prepare_command(gpt2, tmp_path, capsys):
    argv = ["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "input.txt"), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "(256 tokens, bytes tokenizer) is not the model's (300" in err
    assert f"crystal prepare INPUT --out DIR --tokenizer {gpt2 / 'hf'}" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 400))
def test_a_damaged_safetensors_header_loads_or_is_a_crystal_error(gpt2, tmp_path, edits, cut):
    from crystal.errors import CrystalError

    d = tmp_path / "damaged"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_bytes((gpt2 / "hf" / "config.json").read_bytes())
    data = bytearray((gpt2 / "hf" / "model.safetensors").read_bytes())
    for pos, val in edits:  # the header is the first ~2,800 bytes
        data[pos] = val
    (d / "model.safetensors").write_bytes(bytes(data[:len(data) - cut]))
    try:
        load_checkpoint(d)
    except CrystalError:
        pass


# --- prepare with the model's tokenizer ----------------------------------------------------------

def test_prepare_with_the_models_tokenizer_writes_exactly_its_ids(gpt2):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gpt2 / "hf" / "tokenizer.json"))
    text = (gpt2 / "input.txt").read_text(encoding="utf-8")  # 100,000 characters: more than one 64K piece
    train, _ = read_tokens(gpt2 / "data" / "train.bin")
    val, vocab = read_tokens(gpt2 / "data" / "val.bin")
    assert vocab == tok.get_vocab_size() == 300 and train.dtype == np.uint16
    assert np.concatenate([train, val]).tolist() == tok.encode(text).ids


def test_prepare_writes_the_models_tokenizer_json_verbatim(gpt2):
    assert (gpt2 / "data" / "tokenizer.json").read_bytes() == (gpt2 / "hf" / "tokenizer.json").read_bytes()


def test_prepare_takes_a_tokenizer_json_file_as_well_as_its_directory(gpt2, tmp_path):
    assert main(["prepare", str(gpt2 / "input.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(gpt2 / "hf" / "tokenizer.json")]) == 0
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "d" / f).read_bytes() == (gpt2 / "data" / f).read_bytes()


# --- training from it ----------------------------------------------------------------------------

def test_training_starts_from_bitwise_the_checkpoints_tensors(gpt2, finetuned):
    assert np.array_equal(bits(finetuned.start), bits(stored_flat(gpt2 / "hf")))


def test_twenty_fine_tuning_steps_lower_the_loss(gpt2, finetuned):
    x, y = val_batch(gpt2)
    assert hf_loss(torch_model(finetuned.export), x, y) < hf_loss(torch_model(gpt2 / "hf"), x, y)


def test_the_run_keeps_the_models_shape_and_tokenizer(gpt2, finetuned):
    assert (finetuned.run / "tokenizer.json").read_bytes() == (gpt2 / "hf" / "tokenizer.json").read_bytes()
    assert load_checkpoint(finetuned.run).config == load_checkpoint(gpt2 / "hf").config
    assert json.loads((finetuned.run / "train.json").read_text())["init_from"] == str(gpt2 / "hf")


def test_the_export_of_the_fine_tuned_run_loads_in_transformers_with_crystals_logits(gpt2, finetuned):
    x, _ = val_batch(gpt2)
    with torch.no_grad():
        theirs = torch_model(finetuned.export)(torch.tensor(x)).logits.numpy()
    assert rel_err(theirs, load_checkpoint(finetuned.run).logits(x)) <= 1e-4


def test_the_exported_tokenizer_is_the_models(gpt2, finetuned):
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(finetuned.export), local_files_only=True)
    text = (gpt2 / "input.txt").read_text(encoding="utf-8")[:2000]
    assert tok(text)["input_ids"] == Tokenizer.from_file(str(gpt2 / "hf" / "tokenizer.json")).encode(text).ids
    assert tok.eos_token == EOT and transformers.GPT2Config.from_pretrained(str(finetuned.export)).eos_token_id == 0


def transformers_greedy(directory, n=20) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = torch_model(directory)
    model.generation_config.eos_token_id = None  # all n tokens, as crystal sample gives
    with torch.no_grad():
        out = model.generate(tok(PROMPT, return_tensors="pt")["input_ids"], max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0].tolist()


def test_greedy_generation_gives_transformers_greedy_token_ids(finetuned):
    from crystal.data import run_tokenizer
    from crystal.sample import generate

    prompt = run_tokenizer(finetuned.run).encode(PROMPT).tolist()
    ids = generate(load_checkpoint(finetuned.run), prompt, 20, temperature=0)
    assert ids == transformers_greedy(finetuned.export) and len(ids) == len(prompt) + 20


def test_crystal_sample_at_temperature_0_prints_transformers_greedy_text(finetuned, capsys):
    expected = transformers.AutoTokenizer.from_pretrained(str(finetuned.export)).decode(
        transformers_greedy(finetuned.export))
    capsys.readouterr()
    assert main(["sample", str(finetuned.run), "--prompt", PROMPT, "--tokens", "20", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_a_crystal_run_as_init_from_starts_from_its_parameters_with_fresh_optimizer_state(gpt2, finetuned, tmp_path):
    trained = load_checkpoint(finetuned.run)
    start = train_recording(["--init-from", str(finetuned.run), "--data", str(gpt2 / "data"), "--steps", "2",
                             "--quiet", "--out", str(tmp_path / "again")], trained.layout.size)
    assert np.array_equal(bits(start), bits(trained.flat))
    steps = [json.loads(l)["step"] for l in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1  # a new run from step 1, not --resume's step 21


def test_a_crystal_run_stopped_before_its_end_gives_its_newest_checkpoint(gpt2, tmp_path):
    base = ["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--steps", "6", "--quiet"]
    assert main([*base, "--stop-at", "3", "--out", str(tmp_path / "stopped")]) == 0
    from crystal.checkpoint import read_params

    cfg = load_checkpoint(gpt2 / "hf").config
    newest = read_params(tmp_path / "stopped" / "checkpoints" / "step-00000003" / "model.safetensors", cfg)
    start = train_recording(["--init-from", str(tmp_path / "stopped"), "--data", str(gpt2 / "data"), "--steps", "1",
                             "--quiet", "--out", str(tmp_path / "next")], newest.size)
    assert np.array_equal(bits(start), bits(newest))


def test_a_fine_tune_stopped_and_resumed_ends_bitwise_as_one_that_never_stopped(gpt2, tmp_path):
    base = ["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--steps", "6", "--quiet",
            "--checkpoint-every", "3"]
    assert main([*base, "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--stop-at", "3", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--quiet"]) == 0
    model = "model.safetensors"
    assert (tmp_path / "straight" / model).read_bytes() == (tmp_path / "resumed" / model).read_bytes()


# --- presets -------------------------------------------------------------------------------------

def test_the_finetune_preset_takes_the_models_shape_and_small_constant_lr(gpt2, tmp_path, capsys):
    assert main(["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--print-config"]) == 0
    (tmp_path / "c.toml").write_text(capsys.readouterr().out)
    preset, model, train = read_toml(str(tmp_path / "c.toml"))
    assert preset == "finetune" and model == {"vocab_size": 300, "block_size": 40, "n_layer": 2, "n_head": 3,
                                              "n_embd": 36, "layer_norm_epsilon": 1e-5, "arch": "gpt2"}
    assert (train["lr"], train["min_lr"], train["warmup"], train["dropout"]) == (3e-5, 3e-5, 20, 0.1)
    assert train["seq_len"] == 40 and train["weight_decay"] == 0.1  # T shrunk to n_positions


def test_a_config_printed_for_a_fine_tune_reads_back_to_the_same_config(gpt2, tmp_path, capsys):
    base = ["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--lr", "1e-4", "--print-config"]
    assert main(base) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


RELEASED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_the_gpt2_presets_have_the_released_models_parameter_counts(preset):
    assert ParamLayout(dataclasses.replace(PRESETS[preset].model, vocab_size=50257)).n_params == RELEASED[preset]


@pytest.mark.parametrize("preset", list(RELEASED))
def test_dry_run_of_each_gpt2_size_prints_its_shape_and_memory(preset, capsys):
    assert main(["train", "--preset", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    m = PRESETS[preset].model
    assert f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, vocab 256, block 1024" in out
    assert f"parameters: {ParamLayout(dataclasses.replace(m, vocab_size=256)).n_params:,}" in out
    assert "total" in out.splitlines()[-1]


def test_dry_run_of_a_fine_tune_prints_the_checkpoints_shape(gpt2, capsys):
    assert main(["train", "--init-from", str(gpt2 / "sharded"), "--data", str(gpt2 / "data"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model: 2 layers, 3 heads, 36 wide, vocab 300, block 40" in out
    assert f"parameters: {ParamLayout(load_checkpoint(gpt2 / 'hf').config).n_params:,}" in out
