"""Hypothesis fuzzing of the loaders: whatever the bytes, only CrystalError escapes."""

import json

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crystal.checkpoint import read_params
from crystal.pretrained import load_checkpoint
from crystal.config import ModelConfig
from crystal.data import TOKEN_HEADER, read_tokens, write_tokens
from crystal.errors import CrystalError
from crystal.model import init_params

CFG = ModelConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=4)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def only_crystal_errors(fn):
    try:
        fn()
    except CrystalError:
        pass


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


def valid_token_file(tmp_path) -> bytes:
    write_tokens(tmp_path / "ok.bin", np.arange(40) % 256, 256)
    return (tmp_path / "ok.bin").read_bytes()


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_as_a_token_file_load_or_raise_crystal_error(tmp_path, data):
    (tmp_path / "t.bin").write_bytes(data)
    only_crystal_errors(lambda: read_tokens(tmp_path / "t.bin"))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 200))
def test_a_damaged_token_file_loads_exactly_or_raises_crystal_error(tmp_path, edits, cut):
    data = mutate(valid_token_file(tmp_path), edits)
    data = data[:len(data) - cut] if cut < len(data) else data
    (tmp_path / "t.bin").write_bytes(data)
    try:
        ids, vocab = read_tokens(tmp_path / "t.bin")
    except CrystalError:
        return
    assert ids.size == (len(data) - TOKEN_HEADER.size) // ids.itemsize and (ids < vocab).all()


def valid_checkpoint(tmp_path):
    from crystal.checkpoint import save_model
    from crystal.model import ParamLayout

    save_model(tmp_path / "model.safetensors", ParamLayout(CFG), init_params(CFG, 0))
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    return (tmp_path / "model.safetensors").read_bytes()


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_model_file_raise_crystal_error(tmp_path, data):
    (tmp_path / "m.safetensors").write_bytes(data)
    only_crystal_errors(lambda: read_params(tmp_path / "m.safetensors", CFG))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 64))
def test_a_damaged_model_file_loads_or_raises_crystal_error(tmp_path, edits, cut):
    data = mutate(valid_checkpoint(tmp_path), edits)
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) - cut])
    only_crystal_errors(lambda: load_checkpoint(tmp_path))


@FUZZ
@given(config=st.recursive(st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                           max_leaves=12),
       overlay=st.dictionaries(st.sampled_from(["n_embd", "n_head", "n_layer", "vocab_size", "n_positions",
                                                "layer_norm_epsilon", "model_type"]),
                               st.none() | st.integers(-3, 10**9) | st.floats() | st.text(max_size=4), max_size=3))
@example(config=None, overlay={"n_embd": float("inf")})  # once crashed int() with OverflowError
@example(config=None, overlay={"n_embd": 22947, "n_head": 1})  # once allocated 23 GiB before checking
def test_any_config_json_loads_or_raises_crystal_error(tmp_path, config, overlay):
    valid_checkpoint(tmp_path)
    base = CFG.to_hf()
    base.update(overlay)
    text = json.dumps(base if overlay else config, allow_nan=True)
    (tmp_path / "config.json").write_text(text)
    only_crystal_errors(lambda: load_checkpoint(tmp_path))
