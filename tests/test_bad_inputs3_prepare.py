"""Bad input, round three (issue 28), for `crystal prepare` and the data sets it writes:

- a data set is replaced whole or not at all, and the loader refuses token files that are not
  the ones meta.json describes (item 2);
- `prepare --tokenizer FILE` writes exactly `tokenizer.encode(text)` whatever the tokenizer's
  normalizer, pre-tokenizer, merges and added tokens (item 7);
- memory is bounded for any line length: a text is encoded in pieces cut where the tokenizer
  proves a boundary, or refused with one line (item 15, with the limits scaled down);
- fine-tuning refuses data prepared with another tokenizer of the same vocabulary size (item 10).

The tokenizers are built here with the `tokenizers` library and compared against its own
`encode`.
"""

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crystal.atomic
import crystal.data
from crystal.cli import main
from crystal.data import EOT, Cutter, default_corpus, read_tokens

tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers library")
from tokenizers import AddedToken, Tokenizer, decoders, models, trainers  # noqa: E402
from tokenizers import normalizers as N  # noqa: E402
from tokenizers import pre_tokenizers as P  # noqa: E402

TEXT = default_corpus()[:100_000].decode()  # more than one 64K piece


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prepared_ids(directory: Path) -> list[int]:
    train, _ = read_tokens(directory / "train.bin")
    val, _ = read_tokens(directory / "val.bin")
    return np.concatenate([train, val]).tolist()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "input.txt").write_text(TEXT, encoding="utf-8")
    (root / "other.txt").write_bytes(default_corpus()[200_000:230_000])  # another length
    (root / "upper.txt").write_text(TEXT.upper(), encoding="utf-8")  # the same length, other bytes
    return root


# --- item 2: a data set is replaced whole ----------------------------------------------------------

def fail_writing(monkeypatch, name: str):
    """Every atomic write of a file called `name` fails as on a full disk."""
    original = crystal.atomic.atomic_write_chunks

    def write(path, chunks):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, chunks)

    monkeypatch.setattr(crystal.atomic, "atomic_write_chunks", write)  # atomic_write_bytes's too
    monkeypatch.setattr(crystal.data, "atomic_write_chunks", write)  # token files, written as they are read


@pytest.mark.parametrize("failing", ["train.bin", "val.bin", "tokenizer.json", "meta.json"])
def test_a_prepare_that_fails_half_way_leaves_the_old_data_set_byte_for_byte(inputs, tmp_path, monkeypatch, capsys,
                                                                             failing):
    out = tmp_path / "data"
    assert main(["prepare", str(inputs / "input.txt"), "--out", str(out)]) == 0
    before = hashes(tmp_path)
    fail_writing(monkeypatch, failing)
    assert main(["prepare", str(inputs / "other.txt"), "--out", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_failed_prepare_into_a_new_directory_creates_nothing(inputs, tmp_path, monkeypatch, capsys):
    fail_writing(monkeypatch, "meta.json")
    assert main(["prepare", str(inputs / "input.txt"), "--out", str(tmp_path / "data")]) == 2
    one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_prepare_over_an_earlier_data_set_leaves_exactly_the_new_one(inputs, tmp_path):
    assert main(["prepare", str(inputs / "input.txt"), "--out", str(tmp_path / "data"), "--tokenizer", "bpe",
                 "--vocab-size", "300"]) == 0
    assert main(["prepare", str(inputs / "other.txt"), "--out", str(tmp_path / "data")]) == 0
    assert main(["prepare", str(inputs / "other.txt"), "--out", str(tmp_path / "fresh")]) == 0
    new, fresh = hashes(tmp_path / "data"), hashes(tmp_path / "fresh")
    assert new.keys() == fresh.keys() == {"train.bin", "val.bin", "tokenizer.json", "meta.json"}
    assert all(new[f] == fresh[f] for f in ("train.bin", "val.bin", "tokenizer.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fresh"]  # no sibling left behind


def test_a_prepare_through_a_symlink_replaces_the_data_set_it_names(inputs, tmp_path):
    assert main(["prepare", str(inputs / "input.txt"), "--out", str(tmp_path / "data")]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert main(["prepare", str(inputs / "other.txt"), "--out", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink()
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["sources"] == [str(inputs / "other.txt")]


def two_data_sets(inputs, tmp_path, second: str):
    for name, source in (("a", "input.txt"), ("b", second)):
        assert main(["prepare", str(inputs / source), "--out", str(tmp_path / name)]) == 0
    return tmp_path / "a", tmp_path / "b"


def train_on(data: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--print-config"]


@pytest.mark.parametrize("swapped", ["train.bin", "val.bin"])
def test_a_token_file_of_another_prepare_is_refused(inputs, tmp_path, capsys, swapped):
    a, b = two_data_sets(inputs, tmp_path, "other.txt")
    (a / swapped).write_bytes((b / swapped).read_bytes())
    assert main(train_on(a)) == 2
    assert f"{swapped} holds" in one_error_line(capsys)


def test_token_files_of_another_prepare_with_the_same_counts_are_refused(inputs, tmp_path, capsys):
    a, b = two_data_sets(inputs, tmp_path, "upper.txt")
    (a / "val.bin").write_bytes((b / "val.bin").read_bytes())
    assert main(train_on(a)) == 2
    assert "not the ones meta.json describes" in one_error_line(capsys)


def test_a_data_set_whose_meta_json_has_no_token_hash_is_checked_by_its_counts(inputs, tmp_path, capsys):
    a, _ = two_data_sets(inputs, tmp_path, "upper.txt")
    meta = json.loads((a / "meta.json").read_text())
    del meta["tokens_sha256"], meta["tokenizer_identity"], meta["train_shards"], meta["val_shards"]  # as crystal wrote it before
    (a / "meta.json").write_text(json.dumps(meta))
    assert main(train_on(a)) == 0
    meta["train_tokens"] += 1
    (a / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(train_on(a)) == 2
    assert "train.bin holds" in one_error_line(capsys)


# --- item 7: exactly tokenizer.encode(text) ------------------------------------------------------------

def bpe(normalizer=None, pre_tokenizer=P.ByteLevel(add_prefix_space=False), text=TEXT, vocab=400):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                                        initial_alphabet=P.ByteLevel.alphabet()))
    return tok


def with_stripping_eot(tok):
    tok.add_special_tokens([AddedToken("<|sep|>", lstrip=True, rstrip=True)])
    return tok


def newline_merges():
    """A byte-level BPE without a pre-tokenizer regex whose merges join a newline to the capital
    letter after it (Ċ is the newline's byte symbol), and "a" to a newline."""
    alphabet = sorted(P.ByteLevel.alphabet())
    joined = [("Ċ", chr(c)) for c in range(ord("A"), ord("Z") + 1)] + [("a", "Ċ")]
    vocab = {t: i for i, t in enumerate(alphabet + ["".join(m) for m in joined] + [EOT])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=joined))
    tok.pre_tokenizer = P.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


TOKENIZERS = {  # name: (build, text)
    "a Replace newline-to-space normalizer": (lambda: bpe(N.Replace("\n", " ")), TEXT),
    "merges across newlines (no pre-tokenizer regex)": (newline_merges, TEXT),
    "Metaspace with a space-to-metaspace normalizer": (
        lambda: bpe(N.Replace(" ", "▁"), P.Metaspace(prepend_scheme="always")), TEXT),
    "NFC and Lowercase over combining accents": (
        lambda: bpe(N.Sequence([N.NFC(), N.Lowercase()])), TEXT.replace("e", "e\u0301").replace("\nA", "\n\u0301A")),
    "a Prepend normalizer (never cut)": (
        lambda: bpe(N.Sequence([N.Prepend("▁"), N.Replace(" ", "▁")]), P.Metaspace(prepend_scheme="never")), TEXT),
    "GPT-2 style with end-of-text tokens": (lambda: bpe(), TEXT.replace("\n\n", f"\n{EOT}\n")),
    "an added token that strips whitespace": (lambda: with_stripping_eot(bpe()), TEXT.replace("\n\n", " <|sep|>  \n")),
    "Whitespace pre-tokenizer": (lambda: bpe(pre_tokenizer=P.Whitespace()), TEXT),
}


@pytest.fixture(scope="module")
def built():
    return {name: build() for name, (build, _) in TOKENIZERS.items()}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_prepare_with_a_given_tokenizer_writes_exactly_its_encode_ids(name, built, tmp_path):
    tok, text = built[name], TOKENIZERS[name][1]
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "tokenizer.json")]) == 0
    assert prepared_ids(tmp_path / "d") == tok.encode(text, add_special_tokens=False).ids


def test_a_tokenizer_json_truncation_and_padding_do_not_cut_the_token_stream(built, tmp_path):
    tok = Tokenizer.from_str(built["GPT-2 style with end-of-text tokens"].to_str())
    tok.enable_truncation(max_length=128)
    tok.enable_padding(length=256)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "input.txt").write_text(TEXT, encoding="utf-8")
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "tokenizer.json")]) == 0
    tok.no_truncation()
    tok.no_padding()
    assert prepared_ids(tmp_path / "d") == tok.encode(TEXT, add_special_tokens=False).ids


PARTS = ["a", "b", "ab", "é", "e\u0301", "\u0301", "Σ", " ", "  ", "\n", "\n\n", " \n", "\t", "1", "234", ".", "'s",
         EOT, "<|sep|>", "▁"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(PARTS), min_size=100, max_size=1000), name=st.sampled_from(sorted(TOKENIZERS)))
def test_pieces_cut_every_hundred_characters_encode_to_the_whole_texts_ids(parts, name, built, monkeypatch):
    monkeypatch.setattr(crystal.data, "PIECE_CHARS", 100)
    tok, text = built[name], "".join(parts)
    pieces = list(Cutter(tok).pieces(text, "input"))
    assert "".join(pieces) == text
    ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids


# --- item 15: bounded memory for any line length -------------------------------------------------------

@pytest.fixture
def small_limits(monkeypatch):
    """The limits scaled down 200 times: pieces of about 2,000 characters, at most 20,000 at once."""
    monkeypatch.setattr(crystal.data, "PIECE_CHARS", 2_000)
    monkeypatch.setattr(crystal.data, "MAX_PIECE_CHARS", 20_000)


ONE_LINE = TEXT.replace("\n", " ")[:60_000]


def prepare_one_line(built, name, tmp_path, text=ONE_LINE) -> int:
    (tmp_path / "line.txt").write_text(text, encoding="utf-8")
    built[name].save(str(tmp_path / "tokenizer.json"))
    return main(["prepare", str(tmp_path / "line.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "tokenizer.json")])


def test_a_line_longer_than_the_limit_is_encoded_in_bounded_pieces(built, small_limits):
    pieces = list(Cutter(built["GPT-2 style with end-of-text tokens"]).pieces(ONE_LINE, "line"))
    assert "".join(pieces) == ONE_LINE and len(pieces) > 3 and max(map(len, pieces)) <= 20_000


def test_a_line_longer_than_the_limit_is_prepared_to_exactly_its_encode_ids(built, small_limits, tmp_path):
    name = "GPT-2 style with end-of-text tokens"
    assert prepare_one_line(built, name, tmp_path) == 0
    assert prepared_ids(tmp_path / "d") == built[name].encode(ONE_LINE, add_special_tokens=False).ids


def test_a_line_without_a_proven_boundary_over_the_limit_is_refused(built, small_limits, tmp_path, capsys):
    assert prepare_one_line(built, "merges across newlines (no pre-tokenizer regex)", tmp_path) == 2
    assert "no token boundary" in one_error_line(capsys) and not (tmp_path / "d").exists()


def test_a_normalizer_that_may_join_across_cuts_refuses_texts_over_the_limit(built, small_limits, tmp_path, capsys):
    assert prepare_one_line(built, "a Prepend normalizer (never cut)", tmp_path) == 2
    assert "normalizer (Prepend+Replace)" in one_error_line(capsys) and not (tmp_path / "d").exists()


def test_a_normalizer_that_may_join_across_cuts_encodes_texts_under_the_limit_whole(built, small_limits, tmp_path):
    name, text = "a Prepend normalizer (never cut)", ONE_LINE[:15_000]
    assert prepare_one_line(built, name, tmp_path, text) == 0
    assert prepared_ids(tmp_path / "d") == built[name].encode(text, add_special_tokens=False).ids


# --- item 10: the data's tokenizer identity is the model's -------------------------------------------

@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A tiny crystal run on BPE data (vocabulary 300): a model to fine-tune, with its tokenizer.json."""
    root = tmp_path_factory.mktemp("model")
    (root / "input.txt").write_text(TEXT[:60_000], encoding="utf-8")
    assert main(["prepare", str(root / "input.txt"), "--out", str(root / "data"), "--tokenizer", "bpe",
                 "--vocab-size", "300"]) == 0
    assert main(["train", "--preset", "tiny", "--steps", "1", "--quiet", "--data", str(root / "data"),
                 "--out", str(root / "run")]) == 0
    return root


def variant(model_run, tmp_path, change) -> Path:
    """Data prepared with the model's tokenizer.json as `change` edits it (its JSON object)."""
    spec = json.loads((model_run / "run" / "tokenizer.json").read_text())
    change(spec)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, indent=4), encoding="utf-8")
    assert main(["prepare", str(model_run / "input.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "tokenizer.json")]) == 0
    return tmp_path / "d"


def swap_last_merges(spec):
    merges = spec["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]


def add_lowercase(spec):
    spec["normalizer"] = {"type": "Lowercase"}


def finetune(model_run, data) -> list[str]:
    return ["train", "--init-from", str(model_run / "run"), "--data", str(data), "--print-config"]


@pytest.mark.parametrize("change", [swap_last_merges, add_lowercase], ids=["other merges", "another normalizer"])
def test_data_of_a_tokenizer_with_the_models_vocabulary_but_other_rules_is_refused(model_run, tmp_path, capsys,
                                                                                   change):
    data = variant(model_run, tmp_path, change)
    capsys.readouterr()
    assert main(finetune(model_run, data)) == 2
    assert "another tokenizer than the model's" in one_error_line(capsys)


def test_data_of_the_models_tokenizer_written_with_other_spacing_is_accepted(model_run, tmp_path):
    assert main(finetune(model_run, variant(model_run, tmp_path, lambda spec: None))) == 0


def without_identity(data: Path) -> Path:
    meta = json.loads((data / "meta.json").read_text())
    del meta["tokenizer_identity"]  # as crystal wrote it before recording one
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def test_data_without_a_recorded_identity_is_compared_by_its_tokenizer_json(model_run, tmp_path, capsys):
    assert main(finetune(model_run, without_identity(variant(model_run, tmp_path / "same", lambda s: None)))) == 0
    other = without_identity(variant(model_run, tmp_path / "other", swap_last_merges))
    capsys.readouterr()
    assert main(finetune(model_run, other)) == 2
    assert "another tokenizer than the model's" in one_error_line(capsys)


def test_the_recorded_identity_is_what_fine_tuning_compares(model_run, tmp_path, capsys):
    data = variant(model_run, tmp_path, lambda spec: None)
    other = json.loads((variant(model_run, tmp_path / "o", swap_last_merges) / "meta.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer_identity"] = other["tokenizer_identity"]  # the tokens were made with the other one
    (data / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(finetune(model_run, data)) == 2
    assert "another tokenizer than the model's" in one_error_line(capsys)
