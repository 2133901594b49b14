"""Bad input, round three: model directories that load differently than transformers loads them.

Rows of the bad-input table (tests/test_bad_inputs.py: its reference run, damage helpers and
check, one `error:` line, exit 2, every file unchanged) for three classes:
  - config.json as GPT2Config reads it: an attribute_map alias (`num_hidden_layers`, ...) that
    disagrees with its field, and values of a type GPT2Config refuses (a string epsilon, 1 for
    true, 128.0 for an int);
  - safetensors headers the safetensors library refuses (a name twice, aliased, overlapping or
    gapped data_offsets, trailing bytes, non-string `__metadata__`, NaN in the JSON);
  - non-finite weights in a crystal run's own files (eval, export, --init-from, --resume).
Beside them, what must still load: a config.json that names the shape only by the aliases.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from crystal import load_checkpoint
from crystal.cli import main
from test_bad_inputs import R, hf_dir, model, reference, refused, resave, set_json  # noqa: F401 (fixture)

LN_F_BIAS = "transformer.ln_f.bias"


def hf_config(root, key, value):
    set_json(hf_dir(root) / "config.json", key, value)


def rewrite_header(path: Path, change):
    """Rewrite a safetensors file: change(pairs, data) -> (pairs, data), where pairs are the
    header's (key, value) items in order; they are written back as they are (a key may then
    appear twice, a value may be NaN)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    pairs, data = change(list(json.loads(raw[8:8 + n]).items()), raw[8 + n:])
    text = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def entry(pairs, name):
    return next(v for k, v in pairs if k == name)


def duplicate_name(pairs, data):
    """ln_f.bias a second time, on zeros appended to the data (the last one would win in a dict)."""
    e = entry(pairs, LN_F_BIAS)
    size = e["data_offsets"][1] - e["data_offsets"][0]
    return pairs + [(LN_F_BIAS, {**e, "data_offsets": [len(data), len(data) + size]})], data + bytes(size)


def aliased(pairs, data):
    """h.0.ln_1.bias reads h.0.ln_2.bias's bytes (same shape); its own bytes are left unnamed."""
    other = entry(pairs, "transformer.h.0.ln_2.bias")
    return [(k, {**v, "data_offsets": other["data_offsets"]} if k == "transformer.h.0.ln_1.bias" else v)
            for k, v in pairs], data


def overlapping(pairs, data):
    """ln_f.bias starts 4 bytes inside the tensor before it."""
    return [(k, {**v, "data_offsets": [v["data_offsets"][0] - 4, v["data_offsets"][1] - 4]} if k == LN_F_BIAS
             else v) for k, v in pairs], data


def gap(pairs, data):
    """4 unnamed bytes before the tensor that comes last in the data."""
    last = max((v["data_offsets"][0], k) for k, v in pairs if k != "__metadata__")[1]
    start = entry(pairs, last)["data_offsets"][0]
    return [(k, {**v, "data_offsets": [start + 4, v["data_offsets"][1] + 4]} if k == last else v)
            for k, v in pairs], data[:start] + bytes(4) + data[start:]


def header(change):
    """Damage: the Hugging Face directory's model.safetensors rewritten by change(pairs, data)."""
    return lambda r: rewrite_header(hf_dir(r) / "model.safetensors", change)


def run_header(change):
    return lambda r: rewrite_header(model(r), change)


def set_value(name, value):
    return lambda t: t[name].reshape(-1).__setitem__(0, value)


def newest(root):
    return root / "run" / "checkpoints" / "step-00000004"


SAMPLE_HF = ["sample", f"{R}/hf", "--tokens", "2"]
EVAL = ["eval", f"{R}/run"]
INIT_HF = ["train", "--init-from", f"{R}/hf", "--data", f"{R}/bytes", "--steps", "1", "--quiet", "--out", f"{R}/new"]
INIT_RUN = ["train", "--init-from", f"{R}/run", "--data", f"{R}/bytes", "--steps", "1", "--quiet", "--out", f"{R}/new"]
CASES = {
    # config.json: an alias of GPT2Config.attribute_map is the field it names; a disagreeing one is refused
    "config num_hidden_layers disagrees with n_layer (sample)": (lambda r: hf_config(r, "num_hidden_layers", 3),
                                                                 SAMPLE_HF),
    "config num_hidden_layers disagrees with n_layer (init-from)": (lambda r: hf_config(r, "num_hidden_layers", 1),
                                                                    INIT_HF),
    "config hidden_size disagrees with n_embd (eval)": (lambda r: set_json(r / "run" / "config.json", "hidden_size", 64),
                                                        EVAL),
    "config max_position_embeddings disagrees with n_positions": (
        lambda r: hf_config(r, "max_position_embeddings", 16), SAMPLE_HF),
    "config num_attention_heads disagrees with n_head": (lambda r: hf_config(r, "num_attention_heads", 4), SAMPLE_HF),
    "config num_hidden_layers the string of n_layer": (lambda r: hf_config(r, "num_hidden_layers", "2"), SAMPLE_HF),
    "config num_hidden_layers 2.0 beside n_layer 2": (lambda r: hf_config(r, "num_hidden_layers", 2.0), SAMPLE_HF),
    # config.json: types as GPT2Config declares them (transformers refuses the rest)
    "config layer_norm_epsilon a string": (lambda r: hf_config(r, "layer_norm_epsilon", "1e-05"), SAMPLE_HF),
    "config layer_norm_epsilon true": (lambda r: hf_config(r, "layer_norm_epsilon", True), SAMPLE_HF),
    "config n_inner 4 x n_embd as a float": (lambda r: hf_config(r, "n_inner", 128.0), SAMPLE_HF),
    "config scale_attn_weights 1 for true": (lambda r: hf_config(r, "scale_attn_weights", 1), SAMPLE_HF),
    "config tie_word_embeddings 1 for true": (lambda r: hf_config(r, "tie_word_embeddings", 1), SAMPLE_HF),
    "config add_cross_attention 0 for false": (lambda r: hf_config(r, "add_cross_attention", 0), SAMPLE_HF),
    "config bos_token_id a string": (lambda r: hf_config(r, "bos_token_id", "a"), SAMPLE_HF),
    "config eos_token_id a list holding a string": (lambda r: hf_config(r, "eos_token_id", [0, "x"]), SAMPLE_HF),
    "config resid_pdrop a string": (lambda r: hf_config(r, "resid_pdrop", "0.1"), SAMPLE_HF),
    "config use_cache a string": (lambda r: hf_config(r, "use_cache", "yes"), SAMPLE_HF),
    "config activation_function a list": (lambda r: hf_config(r, "activation_function", ["gelu_new"]), SAMPLE_HF),
    "run config vocab_size 256.0 (eval)": (lambda r: set_json(r / "run" / "config.json", "vocab_size", 256.0), EVAL),
    # safetensors headers: the safetensors library's rules
    "hf header names a tensor twice": (header(duplicate_name), SAMPLE_HF),
    "hf header names a tensor twice (init-from)": (header(duplicate_name), INIT_HF),
    "hf header aliases two tensors' bytes": (header(aliased), SAMPLE_HF),
    "hf header overlapping data_offsets": (header(overlapping), SAMPLE_HF),
    "hf header gap between tensors": (header(gap), SAMPLE_HF),
    "hf header trailing bytes after the data": (header(lambda p, d: (p, d + bytes(8))), SAMPLE_HF),
    "hf header __metadata__ value an int": (header(lambda p, d: ([("__metadata__", {"format": 1})] + p[1:], d)),
                                            SAMPLE_HF),
    "hf header __metadata__ a list": (header(lambda p, d: ([("__metadata__", ["pt"])] + p[1:], d)), SAMPLE_HF),
    "hf header NaN in an entry": (header(lambda p, d: ([(k, {**v, "x": float("nan")} if k == LN_F_BIAS else v)
                                                        for k, v in p], d)), SAMPLE_HF),
    "hf header shape holding a float": (header(lambda p, d: ([(k, {**v, "shape": [32.0]} if k == LN_F_BIAS else v)
                                                              for k, v in p], d)), SAMPLE_HF),
    "run header names a tensor twice (eval)": (run_header(duplicate_name), EVAL),
    "run header aliases two tensors' bytes (init-from)": (run_header(aliased), INIT_RUN),
    # non-finite weights: refused wherever weights are loaded, before anything is written
    "eval a run whose model holds NaN": (lambda r: resave(model(r), set_value(LN_F_BIAS, np.nan)), EVAL),
    "export a run whose model holds NaN": (lambda r: resave(model(r), set_value(LN_F_BIAS, np.nan)),
                                           ["export", f"{R}/run", "--out", f"{R}/exported"]),
    "init-from a run whose model holds NaN": (lambda r: resave(model(r), set_value(LN_F_BIAS, np.nan)), INIT_RUN),
    "init-from a run whose model holds -inf": (lambda r: resave(model(r), set_value("transformer.wte.weight",
                                                                                    -np.inf)), INIT_RUN),
    "sample a run's model.safetensors file holding inf": (lambda r: resave(model(r), set_value(
        "transformer.h.1.mlp.c_fc.weight", np.inf)), ["sample", f"{R}/run/model.safetensors"]),
    "resume a checkpoint whose model holds NaN": (lambda r: resave(newest(r) / "model.safetensors",
                                                                   set_value(LN_F_BIAS, np.nan)),
                                                  ["train", "--resume", f"{R}/run"]),
    "resume a checkpoint whose AdamW moments hold inf": (lambda r: resave(newest(r) / "optim.safetensors",
                                                                          set_value("adamw.v", np.inf)),
                                                         ["train", "--resume", f"{R}/run"]),
    "init-from hf whose model holds NaN": (lambda r: resave(hf_dir(r) / "model.safetensors",
                                                            set_value(LN_F_BIAS, np.nan)), INIT_HF),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_input_exits_2_with_one_line_and_changes_no_file(case, reference, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(reference, root)
    damage, argv = CASES[case]
    damage(root)
    refused(root, argv, capsys)


# --- what still loads ------------------------------------------------------------------------------

ALIASES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
           "n_positions": "max_position_embeddings"}


def test_a_config_naming_the_shape_by_transformers_aliases_loads_the_same_model(reference, tmp_path):
    d = tmp_path / "aliased"
    shutil.copytree(reference / "run", d)
    (d / "train.json").unlink()  # a Hugging Face directory, not a run
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({ALIASES.get(k, k): v for k, v in config.items() if k != "n_ctx"}))
    ours, original = load_checkpoint(d), load_checkpoint(reference / "run")
    assert ours.config == original.config
    assert np.array_equal(ours.flat, original.flat)


def test_an_alias_that_agrees_with_its_field_is_accepted(reference, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(reference / "run", d)
    set_json(d / "config.json", "num_hidden_layers", json.loads((d / "config.json").read_text())["n_layer"])
    assert load_checkpoint(d).config == load_checkpoint(reference / "run").config


def test_a_disagreeing_alias_is_named_with_its_field(reference, tmp_path, capsys):
    d = tmp_path / "two"
    shutil.copytree(reference / "run", d)
    set_json(d / "config.json", "num_hidden_layers", 3)
    assert main(["eval", str(d)]) == 2
    assert "num_hidden_layers 3 and n_layer 2 disagree" in capsys.readouterr().err


def test_non_finite_weights_are_named_with_their_tensor(reference, tmp_path, capsys):
    d = tmp_path / "nan"
    shutil.copytree(reference / "run", d)
    resave(d / "model.safetensors", set_value(LN_F_BIAS, np.nan))
    assert main(["eval", str(d)]) == 2
    assert f"{LN_F_BIAS} holds 1 non-finite value" in capsys.readouterr().err
