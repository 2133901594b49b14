"""`crystal export --format hf`: the result loads in Hugging Face transformers, offline."""

import os

import numpy as np
import pytest

from crystal import load_checkpoint
from crystal.cli import main
from crystal.data import default_corpus, prepare

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    (d / "input.txt").write_bytes(default_corpus()[:100_000])
    prepare([str(d / "input.txt")], str(d / "data"), "bpe", vocab_size=320)
    assert main(["train", "--preset", "tiny", "--steps", "5", "--data", str(d / "data"),
                 "--out", str(d / "run")]) == 0
    assert main(["export", str(d / "run"), "--format", "hf", "--out", str(d / "export")]) == 0
    return d / "run", d / "export"


def test_transformers_gpt2_gives_crystals_logits(exported):
    import torch

    run, out = exported
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    ours = load_checkpoint(run)
    idx = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 29))
    with torch.no_grad():
        theirs = hf(torch.tensor(idx)).logits.numpy()
    mine = ours.logits(idx)
    assert np.abs(theirs - mine).max() / np.abs(mine).max() <= 1e-4


def test_the_exported_bpe_tokenizer_round_trips_text(exported):
    _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_generation_through_transformers_decodes_to_text(exported):
    import torch

    _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    ids = tok("KING", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    text = tok.decode(gen[0])
    assert text.startswith("KING") and tok.decode(tok(text)["input_ids"]) == text
