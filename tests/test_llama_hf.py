"""Llama-family models in and out of Hugging Face: LlamaConfig / Qwen2Config as config.json,
`crystal train --init-from DIR` of LlamaForCausalLM / Qwen2ForCausalLM directories, `crystal
export --format hf` of a llama, the llama presets and flags, and the refusals.

The released models are played by tiny random ones (2 layers, 4 heads, 2 KV heads, 64 wide,
SwiGLU 176, a byte-level BPE of ~300 tokens) that transformers builds and saves here: tied,
untied (also sharded and as bfloat16), llama3 rope scaling (theta 500000), Qwen2 (q/k/v biases),
and LlamaModel names without the `model.` prefix. Nothing comes from the Hugging Face hub.
"""

import copy
import json
import os
import shutil

import numpy as np
import pytest

from crystal.checkpoint import RunDir, read_config
from crystal.cli import main
from crystal.config import LLAMA_FIELD_TYPES, PRESETS, QWEN2_FIELD_TYPES, ModelConfig, _json_is, read_toml, resolve
from crystal.data import EOT, default_corpus
from crystal.errors import CrystalError
from crystal.model import ParamLayout
from crystal.pretrained import export_hf, load_params, open_pretrained
from compare import rel_err
from test_bad_inputs import R, refused

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
VARIANTS = ("tied", "untied", "llama3", "qwen2")


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
def llamas(tmp_path_factory):
    """The tiny models, saved as transformers saves them; each directory with its tokenizer, and
    `data`: the corpus prepared with it."""
    root = tmp_path_factory.mktemp("llamas")
    text = default_corpus()[:60_000].decode()
    (root / "input.txt").write_text(text, encoding="utf-8")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(text), eos_token=EOT, bos_token=EOT)
    common = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, **SHAPE)
    configs = {
        "tied": transformers.LlamaConfig(tie_word_embeddings=True, **common),
        "untied": transformers.LlamaConfig(tie_word_embeddings=False, **common),
        "llama3": transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(LLAMA3),
                                           **common),
        "qwen2": transformers.Qwen2Config(tie_word_embeddings=False, **common),
    }
    models = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(i)
        m = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # every tensor unlike any initialization (no unit norms, no zero biases)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        models[name] = m.eval()

    def save(name, m, **kw):
        m.save_pretrained(root / name, **kw)
        tok.save_pretrained(root / name)

    for name, m in models.items():
        save(name, m)
    save("sharded", models["untied"], max_shard_size="20KB")
    save("bfloat16", copy.deepcopy(models["tied"]).to(torch.bfloat16))
    save("base", models["tied"].model)  # LlamaModel: names without the `model.` prefix
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(root / "tied")]) == 0
    return root, models


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def crystal_forward_ready() -> bool:
    """Whether crystal.model computes a llama yet (branch r-llamamodel): the logits tests need it."""
    from crystal.model import GPT

    cfg = ModelConfig(arch="llama", vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=8)
    try:
        GPT.init(cfg).logits([[1, 2]])
    except Exception:  # noqa: BLE001 (the GPT-2 block's names are absent from a llama layout)
        return False
    return True


needs_forward = pytest.mark.skipif(not crystal_forward_ready(), reason="crystal.model has no llama forward yet")


# --- config.json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_a_saved_config_reads_as_transformers_built_it(llamas, variant):
    root, models = llamas
    theirs = models[variant].config
    cfg = read_config(root / variant / "config.json")
    assert (cfg.arch, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.n_embd, cfg.mlp_size,
            cfg.vocab_size, cfg.block_size, cfg.layer_norm_epsilon, cfg.tied, cfg.attention_bias) == (
        "llama", 2, 4, 2, 16, 64, 176, theirs.vocab_size, 32, 1e-5, variant in ("tied", "llama3"),
        variant == "qwen2")
    rope = theirs.rope_parameters
    assert cfg.rope_theta == rope["rope_theta"]
    if variant == "llama3":
        assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                cfg.rope_original_max_position) == ("llama3", 8.0, 1.0, 4.0, 16)
    else:
        assert cfg.rope_scaling is None


@pytest.mark.parametrize("name", ["llama-small", "smollm2-135m", "tinyllama-1.1b", "llama3.2-1b", "qwen2.5-0.5b"])
def test_to_hf_is_a_config_transformers_builds_the_same_model_from_and_reads_back(name):
    cfg = PRESETS[name].model
    d = cfg.to_hf()
    theirs = transformers.AutoConfig.for_model(**copy.deepcopy(d))
    assert type(theirs).__name__ == ("Qwen2Config" if cfg.attention_bias else "LlamaConfig")
    assert (theirs.num_key_value_heads, theirs.head_dim, theirs.intermediate_size, theirs.tie_word_embeddings,
            theirs.rope_parameters["rope_theta"], theirs.rope_parameters["rope_type"]) == (
        cfg.kv_heads, cfg.head_size, cfg.mlp_size, cfg.tie_word_embeddings, cfg.rope_theta, cfg.rope_scaling or "default")
    back = ModelConfig.from_hf(json.loads(json.dumps(d)))
    assert back.to_hf() == d and ModelConfig.from_hf(back.to_hf()) == back
    assert ParamLayout(back).n_params == ParamLayout(cfg).n_params


def test_a_llama_runs_config_json_round_trips(tmp_path):
    model, train = resolve("llama-small", {"n_kv_head": 1, "rope_theta": 500000.0, "tie_word_embeddings": False,
                                           "attention_bias": True})
    with RunDir(tmp_path / "run") as run:
        run.write_configs(model, train)
    back = read_config(tmp_path / "run" / "config.json")
    assert back.to_hf() == model.to_hf() and ParamLayout(back).specs == ParamLayout(model).specs


def test_the_released_shapes_have_their_published_parameter_counts():
    published = {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "tinyllama-1.1b": 1_100_048_384,
                 "llama3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768}
    assert {n: ParamLayout(PRESETS[n].model).n_params for n in published} == published
    small, llama_small = (ParamLayout(PRESETS[n].model).n_params for n in ("small", "llama-small"))
    assert abs(llama_small - small) / small < 0.05


def test_crystals_field_types_refuse_exactly_what_llamaconfig_and_qwen2config_refuse():
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    probes = [1, 0, 0.5, "s", True, False, None, [1], ["s"], [1, "x"], {}]
    for cls, table in ((transformers.LlamaConfig, LLAMA_FIELD_TYPES), (transformers.Qwen2Config, QWEN2_FIELD_TYPES)):
        assert set(table) == set(cls.__annotations__)
        for field, kinds in table.items():
            for v in probes:
                try:
                    cls(**{field: v})
                    theirs = True
                except StrictDataclassFieldValidationError:
                    theirs = False
                except Exception:  # noqa: BLE001 (a value of the right type that the model refuses: 0 heads)
                    theirs = True
                assert _json_is(v, kinds) == theirs, (cls.__name__, field, v)


# --- reading the tensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [*VARIANTS, "sharded", "bfloat16", "base"])
def test_the_loaded_parameters_are_bitwise_the_stored_tensors_and_the_padding_zero(llamas, variant):
    root, models = llamas
    source = {"sharded": "untied", "bfloat16": "tied", "base": "tied"}.get(variant, variant)
    pre = open_pretrained(root / variant)
    flat = load_params(pre)
    layout = ParamLayout(pre.config)
    theirs = state(copy.deepcopy(models[source]).to(torch.bfloat16) if variant == "bfloat16" else models[source])
    views = layout.views(flat)
    assert set(views) == set(theirs) - ({"lm_head.weight"} if pre.config.tied else set())
    for name, v in views.items():
        assert np.array_equal(bits(v), bits(theirs[name])), name
    lo, hi = layout.padding
    assert hi > lo and not flat[lo:hi].any()
    if variant == "sharded":
        assert len(pre.weights) > 1
    if variant == "bfloat16":
        assert any("bfloat16" in n for n in pre.notes)


def test_a_tied_models_lm_head_must_be_its_embedding(llamas, tmp_path):
    from safetensors.numpy import load_file, save_file

    root, _ = llamas
    d = tmp_path / "tied"
    shutil.copytree(root / "tied", d)
    t = load_file(str(d / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    load_params(open_pretrained(d))  # a saved copy is accepted
    t["lm_head.weight"][3, 5] += 1.0
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CrystalError, match="lm_head.weight differs from the token embedding"):
        load_params(open_pretrained(d))


def test_an_untied_model_without_its_lm_head_is_refused(llamas, tmp_path):
    from safetensors.numpy import load_file, save_file

    root, _ = llamas
    d = tmp_path / "untied"
    shutil.copytree(root / "untied", d)
    t = load_file(str(d / "model.safetensors"))
    del t["lm_head.weight"]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CrystalError, match=r"missing \['lm_head.weight'\]"):
        load_params(open_pretrained(d))


# --- export -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_the_export_loads_in_transformers_as_the_same_model(llamas, tmp_path, variant):
    """Tensors bitwise, config the same model, hence the same logits as the model exported."""
    root, models = llamas
    out = export_hf(root / variant, tmp_path / "export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True,
                                                               dtype=torch.float32).eval()
    assert type(theirs).__name__ == type(models[variant]).__name__
    ours, mine = state(theirs), state(models[variant])
    assert ours.keys() == mine.keys()
    for name in mine:
        assert np.array_equal(bits(ours[name]), bits(mine[name])), name
    idx = torch.tensor(np.random.default_rng(0).integers(0, theirs.config.vocab_size, (2, 24)))
    with torch.no_grad():
        assert torch.equal(theirs(idx).logits, models[variant](idx).logits)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.decode(tok("ROMEO: soft")["input_ids"]) == "ROMEO: soft"


@needs_forward
@pytest.mark.parametrize("variant", VARIANTS)
def test_crystals_logits_equal_transformers_after_init_from(llamas, variant):
    from crystal.pretrained import load_checkpoint

    root, models = llamas
    idx = np.random.default_rng(1).integers(0, models[variant].config.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = models[variant](torch.tensor(idx)).logits.numpy()
    assert rel_err(load_checkpoint(root / variant).logits(idx), theirs) <= 1e-5


@needs_forward
@pytest.mark.parametrize("variant", ["untied", "qwen2"])
def test_a_40_step_fine_tune_lowers_the_loss_exports_with_crystals_logits_and_samples_greedily_as_transformers(
        llamas, tmp_path, capsys, variant):
    from crystal.pretrained import load_checkpoint
    from test_generate_llama import hf_greedy_text

    root, _ = llamas
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--init-from", str(root / variant), "--data", str(root / "data"), "--steps", "40",
                 "--lr", "3e-3", "--warmup", "5", "--micro-batches", "2", "--seq-len", "16", "--spheres", "2",
                 "--quiet", "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    idx = np.random.default_rng(2).integers(0, theirs.config.vocab_size, (1, 20))
    with torch.no_grad():
        expected = theirs(torch.tensor(idx)).logits.numpy()
    assert rel_err(load_checkpoint(run).logits(idx), expected) <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "ROMEO:", "--temperature", "0", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + hf_greedy_text(theirs, tok, "ROMEO:", 12) + "\n"


# --- command line -----------------------------------------------------------------------------------

def test_init_from_a_llama_takes_its_shape_and_prints_it(llamas, capsys):
    root, _ = llamas
    assert main(["train", "--init-from", str(root / "llama3"), "--data", str(root / "data"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(llama: 2 KV heads, head 16 wide, SwiGLU 176, rope theta 500000, llama3 scaling x8" in out


def test_llama_flags_and_a_config_file_give_the_same_config(tmp_path, capsys):
    flags = ["--arch", "llama", "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--n-kv-head", "1",
             "--head-dim", "32", "--intermediate-size", "96", "--rope-theta", "500000", "--no-tie-word-embeddings",
             "--attention-bias"]
    assert main(["train", "--preset", "tiny", *flags, "--print-config"]) == 0
    toml = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(toml)
    _, model, _ = read_toml(str(tmp_path / "c.toml"))
    assert model == dict(model, arch="llama", n_kv_head=1, head_dim=32, intermediate_size=96, rope_theta=500000.0,
                         tie_word_embeddings=False, attention_bias=True)
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == toml


def test_dry_run_of_a_released_shape_gives_its_figures_at_the_released_vocabulary(capsys):
    assert main(["train", "--preset", "smollm2-135m", "--device", "cuda", "--precision", "bf16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "at the released vocabulary of 49,152 tokens (the data's is 256): parameters 134,515,008" in out
    assert "bf16 weights" in out and "(llama: 3 KV heads" in out


def test_the_dry_runs_flops_count_every_query_heads_attention_and_no_position_table():
    from crystal.model import flops_per_token

    cfg = PRESETS["llama3.2-1b"].model
    n = ParamLayout(cfg).n_params
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 16 * 2048 * 32 * 64
    untied = PRESETS["tinyllama-1.1b"].model
    assert flops_per_token(untied, 2048) == 6 * (ParamLayout(untied).n_params - 32000 * 2048) + 12 * 22 * 2048 * 2048


# --- refusals: exit 2, one line naming the key, no file written --------------------------------------

CONFIG_ROWS = {  # (source directory, key -> value set in its config.json, text the line must hold)
    "sliding window (qwen2)": ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    "sliding layers (qwen2)": ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    "sliding window (llama)": ("tied", {"sliding_window": 4096}, "sliding_window"),
    "yarn rope": ("tied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                               "original_max_position_embeddings": 16}}, "rope_parameters"),
    "linear rope (old key)": ("tied", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    "dynamic rope": ("tied", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    "rope per layer type": ("qwen2", {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
                            "rope_parameters"),
    "llama3 without factor": ("tied", {"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0}}, "factor"),
    "partial rotary": ("tied", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "experts": ("tied", {"num_experts": 4}, "num_experts"),
    "local experts": ("tied", {"num_local_experts": 8}, "num_local_experts"),
    "qk norm": ("tied", {"qk_norm": True}, "qk_norm"),
    "mlp bias": ("tied", {"mlp_bias": True}, "mlp_bias"),
    "llama attention bias": ("tied", {"attention_bias": True}, "attention_bias"),
    "gelu": ("tied", {"hidden_act": "gelu"}, "hidden_act"),
    "pretraining_tp": ("tied", {"pretraining_tp": 2}, "pretraining_tp"),
    "another model type": ("tied", {"model_type": "mistral"}, "model_type"),
    "kv heads not dividing": ("tied", {"num_key_value_heads": 3}, "num_key_value_heads (3)"),
    "an int epsilon": ("tied", {"rms_norm_eps": 1}, "rms_norm_eps"),
    "a float head_dim": ("qwen2", {"head_dim": 16.0}, "head_dim"),
    "no hidden_size": ("tied", {"hidden_size": None}, "hidden_size"),
}


@pytest.mark.parametrize("row", list(CONFIG_ROWS))
def test_a_config_crystal_cannot_compute_exactly_is_refused_naming_the_key(llamas, tmp_path, capsys, row):
    source, change, key = CONFIG_ROWS[row]
    root, _ = llamas
    d = tmp_path / "hf"
    shutil.copytree(root / source, d)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    if change.get("hidden_size", 0) is None:
        del config["hidden_size"]
    (d / "config.json").write_text(json.dumps(config))
    lines = refused(tmp_path, ["train", "--init-from", f"{R}/hf", "--data", str(root / "data"), "--quiet",
                               "--out", f"{R}/new"], capsys)
    assert key in lines[0], lines[0]


CLI_ROWS = {
    "unknown arch": (["--arch", "bert"], "--arch"),
    "zero kv heads": (["--arch", "llama", "--n-kv-head", "0"], "--n-kv-head"),
    "kv heads not dividing": (["--arch", "llama", "--n-kv-head", "3"], "--n-kv-head"),
    "kv heads on gpt2": (["--n-kv-head", "2"], "--n-kv-head"),
    "kv heads not a number": (["--arch", "llama", "--n-kv-head", "two"], "--n-kv-head"),
    "odd head size": (["--arch", "llama", "--head-dim", "7"], "head size"),
    "negative rope theta": (["--arch", "llama", "--rope-theta", "-1"], "--rope-theta"),
    "llama flag on a gpt2 preset": (["--no-tie-word-embeddings"], "--tie-word-embeddings"),
    "a llama flag with --init-from": (["--init-from", "{data}/../tied", "--n-kv-head", "1"], "--n-kv-head"),
}


@pytest.mark.parametrize("row", list(CLI_ROWS))
def test_nonsense_llama_flags_are_refused(llamas, tmp_path, capsys, row):
    argv, key = CLI_ROWS[row]
    root, _ = llamas
    argv = [a.replace("{data}", str(root / "data")) for a in argv]
    lines = refused(tmp_path, ["train", "--preset", "tiny", "--data", str(root / "data"), "--quiet",
                               "--out", f"{R}/new", *argv], capsys)
    assert key in lines[0], lines[0]
