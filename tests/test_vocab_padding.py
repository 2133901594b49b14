"""The LM head's vocabulary padded to a multiple of 64 in the flat buffer (crystal.model.ParamLayout).

A tiny Hugging Face GPT-2 whose vocabulary, 333 tokens, is no multiple of 64 (384 rows in memory)
is fine-tuned, exported and sampled: the padding rows are zero and stay zero, no file holds
them, and every logit crystal shows (its API, `crystal sample`, the export) is one of the 333
real ones, equal to transformers'. The bitwise contracts hold with the padding
(tests/test_cuda_backend_emulated.py trains a padded vocabulary on the cuda backend too).
"""

import os

import numpy as np
import pytest

from crystal import load_checkpoint
from crystal.checkpoint import RunDir, load_tensors, read_params
from crystal.cli import main
from crystal.config import ModelConfig, resolve
from crystal.data import EOT, default_corpus, load_dataset, read_tokens
from crystal.model import GPT, ParamLayout
from crystal.sample import generate
from crystal.trainer import train
from compare import rel_err

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_finetune import train_tokenizer  # noqa: E402  (after the skips: it needs transformers)

V, VP, C = 333, 384, 36
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The 333-token GPT-2 as transformers saves it, its tokenizer beside; the corpus prepared
    in its tokens; 3 fine-tuning steps from it (a checkpoint at the last) and their export."""
    root = tmp_path_factory.mktemp("gpt2_333")
    text = default_corpus()[:100_000].decode()
    (root / "input.txt").write_text(text, encoding="utf-8")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text, V), eos_token=EOT,
                                               bos_token=EOT)
    assert len(tok) == V
    cfg = transformers.GPT2Config(vocab_size=V, bos_token_id=0, eos_token_id=0, n_positions=40, n_embd=C,
                                  n_layer=2, n_head=3)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # unlike any initialization
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(root / "hf")]) == 0
    assert main(["train", "--init-from", str(root / "hf"), "--data", str(root / "data"), "--steps", "3",
                 "--micro-batches", "4", "--spheres", "2", "--weight-decay", "0.1", "--checkpoint-every", "3",
                 "--quiet", "--out", str(root / "run")]) == 0
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(root / "export")]) == 0
    return root


def torch_model(directory):
    return transformers.GPT2LMHeadModel.from_pretrained(str(directory), local_files_only=True).eval()


def val_inputs(gpt2, rows=3) -> np.ndarray:
    ids, _ = read_tokens(gpt2 / "data" / "val.bin")
    return np.stack([ids[i * 40:(i + 1) * 40] for i in range(rows)]).astype(np.int64)


def padding_of(flat: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    lo, hi = ParamLayout(cfg).padding
    return flat[lo:hi]


def test_the_layout_pads_333_rows_to_384_zero_rows_after_the_real_ones(gpt2):
    model = load_checkpoint(gpt2 / "hf")
    layout = model.layout
    assert model.config.padded_vocab_size == VP
    assert layout.padding == (V * C, VP * C) and layout.size == layout.n_params + (VP - V) * C
    assert model.params["transformer.wte.weight"].shape == (V, C)
    assert not padding_of(model.flat, model.config).any()


def test_dry_run_prints_the_padded_width(gpt2, capsys):
    assert main(["train", "--init-from", str(gpt2 / "hf"), "--data", str(gpt2 / "data"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = ParamLayout(load_checkpoint(gpt2 / "hf").config).n_params
    assert f"vocab {V}, block 40" in out
    assert f"parameters: {n:,} (+{(VP - V) * C:,} zeros in memory: the LM head's vocabulary padded {V} -> {VP}" in out


def test_run_checkpoint_and_export_files_hold_the_333_real_rows_only(gpt2):
    n = ParamLayout(load_checkpoint(gpt2 / "hf").config).n_params
    ckpt = gpt2 / "run" / "checkpoints" / "step-00000003"
    for path in (gpt2 / "run" / "model.safetensors", ckpt / "model.safetensors", gpt2 / "export" / "model.safetensors"):
        assert load_tensors(path)["transformer.wte.weight"].shape == (V, C)
    assert {k: t.shape for k, t in load_tensors(ckpt / "optim.safetensors").items()} == \
        {"adamw.m": (n,), "adamw.v": (n,)}


def test_fine_tuned_logits_equal_transformers_on_the_real_rows(gpt2):
    x = val_inputs(gpt2)
    with torch.no_grad():
        theirs = torch_model(gpt2 / "export")(torch.tensor(x)).logits.numpy()
    mine = load_checkpoint(gpt2 / "run").logits(x)
    assert theirs.shape == mine.shape == (3, 40, V)
    assert rel_err(mine, theirs) <= 1e-5


def test_the_released_models_logits_equal_transformers_before_training(gpt2):
    x = val_inputs(gpt2)
    with torch.no_grad():
        theirs = torch_model(gpt2 / "hf")(torch.tensor(x)).logits.numpy()
    assert rel_err(load_checkpoint(gpt2 / "hf").logits(x), theirs) <= 1e-5


def test_crystal_sample_at_temperature_0_prints_transformers_greedy_text(gpt2, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(str(gpt2 / "export"), local_files_only=True)
    model = torch_model(gpt2 / "export")
    model.generation_config.eos_token_id = None  # all the tokens, as crystal sample gives
    with torch.no_grad():
        ids = model.generate(tok(PROMPT, return_tensors="pt")["input_ids"], max_new_tokens=15, do_sample=False,
                             pad_token_id=0)[0].tolist()
    capsys.readouterr()
    assert main(["sample", str(gpt2 / "run"), "--prompt", PROMPT, "--tokens", "15", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode(ids) + "\n"


def test_sampling_draws_real_tokens_only_even_where_the_padding_would_win():
    model = GPT.init(ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    p = model.params  # views of the model's buffer: ln_f gives 1s, every real logit is -4 < 0, a padding row's
    p["transformer.wte.weight"][...] = -1.0
    p["transformer.ln_f.weight"][...] = 0.0
    p["transformer.ln_f.bias"][...] = 1.0
    assert model.logits(np.array([[1, 2]])).shape == (1, 2, 5)
    assert generate(model, [1], 5, temperature=0)[1:] == [0] * 5  # the first of the tied real logits
    assert all(0 <= t < 5 for t in generate(model, [1], 50, temperature=5.0, seed=3))


# --- the padding in training: zero rows, zero gradient, the bitwise contracts ----------------------

def small_run(gpt2, spheres: int):
    """Two tiny steps on the 333-token data (weight decay on), from a seeded init."""
    model_cfg, cfg = resolve("tiny", dict(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=8),
                             dict(steps=2, spheres=spheres, micro_batches=3, batch_size=1, weight_decay=0.1))
    return train(model_cfg, cfg, dataset=load_dataset(str(gpt2 / "data")))


@pytest.fixture(scope="module")
def cpu_runs(gpt2):
    return {s: small_run(gpt2, s) for s in (1, 3)}


def test_the_padding_rows_stay_zero_through_adamw_with_weight_decay(cpu_runs):
    run = cpu_runs[3]
    assert not padding_of(run.params, run.model).view(np.uint32).any()  # +0.0, every one
    assert np.isfinite(run.params).all()


def test_padded_training_is_bitwise_the_same_for_1_and_3_spheres(cpu_runs):
    assert cpu_runs[1].losses == cpu_runs[3].losses
    assert cpu_runs[1].params.tobytes() == cpu_runs[3].params.tobytes()


def test_a_checkpoint_reads_back_as_the_padded_buffer_with_zero_moments_in_the_padding(gpt2):
    cfg = load_checkpoint(gpt2 / "hf").config
    state = RunDir(gpt2 / "run", resume=True).load_state(cfg)
    final = read_params(gpt2 / "run" / "model.safetensors", cfg)  # the checkpoint is the last step's
    assert state.params.shape == state.m.shape == state.v.shape == (ParamLayout(cfg).size,)
    assert state.params.tobytes() == final.tobytes()
    assert not padding_of(state.m, cfg).any() and not padding_of(state.v, cfg).any()
    assert state.v[:V * C].any()  # real moments there
