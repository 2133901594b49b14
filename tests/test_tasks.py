"""`crystal eval RUN --task FILE` (issue 32, item 5): HellaSwag-format multiple choice scored as
llm.c's hellaswag.py scores it, against transformers' GPT2LMHeadModel and torch's log_softmax on
a tiny random GPT-2 and a task file generated here; and the task file's refusals."""

import json
import os
import re

import numpy as np
import pytest
from test_bad_inputs import R, refused

from crystal import load_checkpoint
from crystal.cli import main
from crystal.data import EOT, BPETokenizer, default_corpus
from crystal.pretrained import checkpoint_tokenizer
from crystal.tasks import load_task, score

transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")
torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = default_corpus()[:50_000].decode()
BLOCK = 40


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers with a BPE tokenizer trained here, and a task
    file of 9 examples cut from the corpus (one longer than the model's block size)."""
    root = tmp_path_factory.mktemp("hf")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=BPETokenizer.train([TEXT], 300).tok,
                                               eos_token=EOT, bos_token=EOT)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    words = TEXT.split()
    with open(root / "task.jsonl", "w") as f:
        for i in range(9):
            at = int(rng.integers(len(words) - 200))
            n = 60 if i == 5 else int(rng.integers(3, 12))  # example 5: the context is cut from the left
            ends = [" ".join(words[at + n + 20 * k:at + n + 20 * k + int(rng.integers(1, 6))]) for k in range(4)]
            f.write(json.dumps({"ctx": " ".join(words[at:at + n]), "endings": ends, "label": int(rng.integers(4)),
                                "activity_label": "ignored"}) + "\n")
    return root


def reference(directory, task):
    """llm.c's hellaswag.py with transformers' model: per example, rows ctx + ending (" " + ending
    encoded by itself), summed and mean cross-entropy of the ending tokens by log_softmax."""
    from tokenizers import Tokenizer

    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    sums, means, labels = [], [], []
    for line in open(task):
        ex = json.loads(line)
        ctx = tok.encode(ex["ctx"], add_special_tokens=False).ids
        s_row, m_row = [], []
        for e in ex["endings"]:
            end = tok.encode(" " + e, add_special_tokens=False).ids
            row = torch.tensor((ctx + end)[-(BLOCK + 1):])
            with torch.no_grad():
                logp = torch.log_softmax(model(row[None, :-1]).logits[0].double(), dim=-1)
            nll = -logp[torch.arange(len(row) - 1), row[1:]][-len(end):]
            s_row.append(float(nll.sum()))
            m_row.append(float(nll.mean()))
        sums.append(s_row)
        means.append(m_row)
        labels.append(ex["label"])
    sums, means, labels = np.array(sums), np.array(means), np.array(labels)
    return sums, means, float(np.mean(sums.argmin(1) == labels)), float(np.mean(means.argmin(1) == labels))


def test_acc_and_acc_norm_are_transformers(hf, capsys):
    sums, means, acc, acc_norm = reference(hf / "model", hf / "task.jsonl")
    model = load_checkpoint(hf / "model")
    tok = checkpoint_tokenizer(hf / "model", model.config)
    r = score(model.token_losses, load_task(hf / "task.jsonl", tok, model.config.block_size))
    np.testing.assert_allclose(r.sum_losses, sums, rtol=1e-4)
    np.testing.assert_allclose(r.mean_losses, means, rtol=1e-4)
    assert (r.acc, r.acc_norm) == (acc, acc_norm)
    assert len(set(sums.argmin(1))) > 1  # the answers are not all one ending
    capsys.readouterr()
    assert main(["eval", str(hf / "model"), "--task", str(hf / "task.jsonl")]) == 0
    m = re.search(r"acc ([0-9.]+) \| acc_norm ([0-9.]+) \| 9 examples", capsys.readouterr().out)
    assert m and (float(m[1]), float(m[2])) == (round(acc, 4), round(acc_norm, 4))
    labels = [json.loads(line)["label"] for line in open(hf / "task.jsonl")][:4]
    assert main(["eval", str(hf / "model"), "--task", str(hf / "task.jsonl"), "--limit", "4"]) == 0
    m = re.search(r"acc ([0-9.]+) \| acc_norm ([0-9.]+) \| 4 examples", capsys.readouterr().out)
    assert m and (float(m[1]), float(m[2])) == (round(float(np.mean(sums[:4].argmin(1) == labels)), 4),
                                                round(float(np.mean(means[:4].argmin(1) == labels)), 4))


def line(**kw) -> str:
    ex = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1}
    ex.update(kw)
    return json.dumps(ex) + "\n"


CASES = {
    "3 endings": line(endings=["a", "b", "c"]),
    "label out of range": line(label=4),
    "label negative": line(label=-1),
    "label a boolean": line(label=True),
    "no ctx": line(ctx=None),
    "an ending not a string": line(endings=["a", "b", 3, "d"]),
    "not json": '{"ctx": "A man", \n',
    "empty": "\n",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_task_file_exits_2_with_one_line(case, hf, tmp_path, capsys):
    (tmp_path / "task.jsonl").write_text(CASES[case] if case == "empty" else line() + CASES[case])
    line_ = refused(tmp_path, ["eval", str(hf / "model"), "--task", f"{R}/task.jsonl"], capsys)[0]
    assert "line 2" in line_ or case == "empty"


def test_a_missing_task_file_task_with_data_and_a_bad_limit_are_refused(hf, tmp_path, capsys):
    refused(tmp_path, ["eval", str(hf / "model"), "--task", f"{R}/nope.jsonl"], capsys)
    (tmp_path / "t.jsonl").write_text(line())
    refused(tmp_path, ["eval", str(hf / "model"), "--task", f"{R}/t.jsonl", "--data", "x"], capsys)
    refused(tmp_path, ["eval", str(hf / "model"), "--task", f"{R}/t.jsonl", "--limit", "0"], capsys)
    refused(tmp_path, ["eval", str(hf / "model"), "--limit", "3"], capsys)
