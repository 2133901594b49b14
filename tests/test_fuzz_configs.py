"""Hypothesis: any TOML value under any config key, and any JSON value in a run's train.json and
state.json or a data set's meta.json, gives exit 0 or exit 2 with one `error:` line, never a
traceback (bad input, round two: types are checked before values)."""

import dataclasses
import datetime
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crystal.cli import main
from crystal.config import ModelConfig, TrainConfig
from crystal.data import default_corpus, prepare

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = [("model", f.name) for f in dataclasses.fields(ModelConfig)] + \
       [("train", f.name) for f in dataclasses.fields(TrainConfig)]

# --- TOML values of every type, written as TOML text ---
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), text,
                    st.dates(), st.datetimes(), st.times())


def toml_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_text(x)}" for k, x in v.items()) + "}"
    return str(v)


toml_values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(text, scalars, max_size=2))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6)


def exits_cleanly(argv, capsys) -> None:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    assert code in (0, 2), out.err
    if code == 2:
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out


@FUZZ
@given(key=st.sampled_from(KEYS), value=toml_values)
def test_any_toml_value_under_any_key(key, value, tmp_path, capsys):
    table, name = key
    (tmp_path / "c.toml").write_text(f"[{table}]\n{name} = {toml_text(value)}\n", encoding="utf-8")
    exits_cleanly(["train", "--preset", "tiny", "--config", str(tmp_path / "c.toml"), "--print-config"], capsys)


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "input.txt").write_bytes(default_corpus()[:30_000])
    prepare([str(root / "input.txt")], str(root / "data"), "bytes")
    assert main(["train", "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2", "--stop-at", "2",
                 "--quiet", "--data", str(root / "data"), "--out", str(root / "run")]) == 0
    return root


def with_json_changed(path, key, value, argv, capsys) -> None:
    """argv run with path's JSON object changed at key (None: the whole file is value); then restored."""
    original = path.read_bytes()
    d = json.loads(original)
    if key is None:
        d = value
    elif "." in key:
        outer, inner = key.split(".")
        d[outer][inner] = value
    else:
        d[key] = value
    path.write_text(json.dumps(d), encoding="utf-8")
    try:
        exits_cleanly(argv, capsys)
    finally:
        path.write_bytes(original)


TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)] + ["data_sha256", None]


@FUZZ
@given(key=st.sampled_from(TRAIN_KEYS), value=json_values)
def test_any_json_value_in_train_json(key, value, run_and_data, capsys):
    run = run_and_data / "run"
    with_json_changed(run / "train.json", key, value, ["train", "--resume", str(run), "--print-config"], capsys)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(TRAIN_KEYS), value=json_values)
def test_any_json_value_in_train_json_for_eval(key, value, run_and_data, capsys):
    run = run_and_data / "run"
    with_json_changed(run / "train.json", key, value, ["eval", str(run), "--batches", "1"], capsys)


@FUZZ
@given(key=st.sampled_from(["format", "step", "adam_t", "data", "params", "data.epoch", "data.cursor", None]),
       value=json_values)
def test_any_json_value_in_state_json(key, value, run_and_data, capsys):
    run = run_and_data / "run"
    state = run / "checkpoints" / "step-00000002" / "state.json"
    with_json_changed(state, key, value, ["train", "--resume", str(run), "--print-config"], capsys)


@FUZZ
@given(key=st.sampled_from(["tokenizer", "vocab_size", "val_bytes", "train_tokens", "val_tokens", "tokens_sha256",
                             "tokenizer_identity", None]),
       value=json_values)
def test_any_json_value_in_meta_json(key, value, run_and_data, capsys):
    data = run_and_data / "data"
    with_json_changed(data / "meta.json", key, value,
                      ["train", "--preset", "tiny", "--data", str(data), "--print-config"], capsys)
