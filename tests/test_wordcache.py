"""crystal.wordcache: the ids it gives an ASCII text are the `tokenizers` library's own, for any
text (every ASCII character, GPT-2's regex edge cases), across a cache reset; it steps aside
(None) for non-ASCII text, an added token in the text, and tokenizers it does not model; and
`crystal prepare` writes the same bytes with it as without it."""

import hashlib
import json
import random

import pytest

import crystal.encode
import crystal.wordcache
from crystal.data import BPETokenizer, default_corpus, prepare
from crystal.wordcache import WordCache, applies

tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers library")

TEXT = default_corpus()[:40_000].decode()


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train([TEXT], 400).tok


def library_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def random_ascii(rng: random.Random, n: int) -> str:
    """Any ASCII character, weighted to the pieces GPT-2's regex decides on: contractions,
    whitespace runs before words, digits beside letters, punctuation after a space."""
    edge = list(" \t\n\r\x0b\x0c\x1c\x1f\x7f'sdtmlvreA9.,") + ["'s", "'ll", "'re", "  ", "\r\n", " '", "  x"]
    return "".join(rng.choice(edge) if rng.random() < 0.7 else chr(rng.randrange(128)) for _ in range(n))


def test_ids_equal_the_library_on_random_ascii_text(tok):
    words, rng = WordCache(tok), random.Random(0)
    for _ in range(3000):
        s = random_ascii(rng, rng.randrange(40))
        assert words.encode(s).tolist() == library_ids(tok, s), repr(s)


def test_ids_equal_the_library_on_the_corpus(tok):
    words = WordCache(tok)
    for at in range(0, len(TEXT), 4000):
        piece = TEXT[at:at + 4000]
        assert words.encode(piece).tolist() == library_ids(tok, piece)


def test_ids_stay_the_library_s_across_a_cache_reset(tok, monkeypatch):
    monkeypatch.setattr(crystal.wordcache, "LIMIT", 20)
    words = WordCache(tok)
    for at in range(0, 8000, 500):
        assert words.encode(TEXT[at:at + 500]).tolist() == library_ids(tok, TEXT[at:at + 500])
    assert len(words.ids) <= 20 + len(set(crystal.wordcache.WORDS.findall(TEXT[7500:8000])))


def test_non_ascii_text_and_added_tokens_are_left_to_the_library(tok):
    words = WordCache(tok)
    assert words.encode("caf\u00e9 au lait") is None
    assert words.encode("one<|endoftext|>two") is None


def test_gpt2_style_tokenizers_apply_and_others_do_not(tok):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    assert applies(tok)
    lowered = Tokenizer.from_str(tok.to_str())
    lowered.normalizer = normalizers.Lowercase()
    prefixed = Tokenizer.from_str(tok.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not any(applies(t) for t in (lowered, prefixed, metaspace))


def test_prepare_writes_the_same_bytes_with_and_without_the_cache(tmp_path, monkeypatch):
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, at in enumerate(range(0, 30_000, 1500)):
            f.write(json.dumps({"text": TEXT[at:at + 1500] + ("caf\u00e9" if i % 3 == 0 else "")}) + "\n")
    (tmp_path / "tokenizer.json").write_text(BPETokenizer.train([TEXT], 400).to_json(), encoding="utf-8")

    def made(name: str) -> dict:
        prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / name), str(tmp_path / "tokenizer.json"), workers=1)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).iterdir())}

    fast = made("fast")
    monkeypatch.setattr(crystal.encode, "applies", lambda tok: False)
    assert made("library") == fast
