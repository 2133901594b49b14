"""Multiple-choice evaluation on HellaSwag-format tasks (`crystal eval RUN --task FILE`, and
`crystal train --eval-task FILE` every --eval-task-every steps).

A task file is JSON lines, one example a line: {"ctx": str, "endings": [4 str], "label": 0-3}
(other fields, such as HellaSwag's activity_label, ctx_a, ctx_b, are ignored). This is the format
of HellaSwag's hellaswag_val.jsonl, which llm.c's dev/data/hellaswag.py downloads from
https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl (10,042
examples); crystal itself never downloads it.

Each ending is scored as llm.c's hellaswag.py (and nanoGPT's, lm-eval's) scores it: the context
and " " + ending are tokenized separately, the rows ctx + ending of the 4 endings are run through
the model, and the cross-entropy of each ending token given everything before it is summed
(acc: the ending of the lowest sum is the model's answer) and averaged over the ending's
tokens (acc_norm: of the lowest mean). A row longer than the model's block_size + 1 keeps its
last block_size + 1 tokens (the context is cut from the left, as lm-eval does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import check_regular
from crystal.errors import CrystalError
from crystal.jsonio import parse_json

ENDINGS = 4
EXAMPLES_PER_BATCH = 8  # 32 rows a forward pass
PAD_TO = 16  # a batch's length is rounded up to this (few distinct activation shapes)


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskResult:
    examples: int
    acc: float  # the lowest summed loss is the label
    acc_norm: float  # the lowest mean loss per ending token is the label
    sum_losses: np.ndarray  # [examples, 4]
    mean_losses: np.ndarray  # [examples, 4]


def read_task(path: str | Path) -> list[Example]:
    """The examples of a HellaSwag-format JSON-lines file, each line checked."""
    path = Path(path)
    if not path.exists():
        raise CrystalError(f"task file not found: {path}")
    check_regular(path)
    if path.is_dir():
        raise CrystalError(f"--task {path} is a directory; give a .jsonl file")
    examples = []
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    examples.append(_example(parse_json(line, f"{path} line {n}"), f"{path} line {n}"))
    except OSError as e:
        raise CrystalError(f"cannot read task file {path}: {e.strerror or e}") from None
    if not examples:
        raise CrystalError(f"{path}: no examples")
    return examples


def _example(value, where: str) -> Example:
    if not isinstance(value, dict):
        raise CrystalError(f"{where}: an example is an object with ctx, endings and label")
    ctx, endings, label = value.get("ctx"), value.get("endings"), value.get("label")
    if not isinstance(ctx, str):
        raise CrystalError(f"{where}: ctx must be a string")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
        got = f"{len(endings)} endings" if isinstance(endings, list) else repr(type(endings).__name__)
        raise CrystalError(f"{where}: endings must be a list of {ENDINGS} strings, got {got}")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy writes "2"
        label = int(label)
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < ENDINGS):
        raise CrystalError(f"{where}: label must be 0-{ENDINGS - 1}, got {label!r}")
    return Example(ctx, tuple(endings), label)


def render(tok, ex: Example, block_size: int, where: str = "task") -> list[tuple[np.ndarray, int]]:
    """For each ending: (the row's ids, how many of its last ids are the ending's)."""
    ctx = [int(i) for i in tok.encode(ex.ctx)]
    rows = []
    for e in ex.endings:
        end = [int(i) for i in tok.encode(" " + e)]  # the leading space, as llm.c's hellaswag.py
        if not end:
            raise CrystalError(f"{where}: an ending with no tokens")
        if len(end) > block_size:
            raise CrystalError(f"{where}: an ending of {len(end)} tokens, more than the model's block size "
                               f"{block_size}")
        row = (ctx + end)[-(block_size + 1):]
        rows.append((np.asarray(row, dtype=np.int32), len(end)))
    return rows


def score(model, tok, examples: list[Example], progress=None) -> TaskResult:
    """Every example's 4 endings scored by `model` (crystal.model.GPT, either backend), a batch of
    EXAMPLES_PER_BATCH examples at a time. progress(done, total) after each batch."""
    block = model.config.block_size
    sums, means = np.zeros((len(examples), ENDINGS)), np.zeros((len(examples), ENDINGS))
    for lo in range(0, len(examples), EXAMPLES_PER_BATCH):
        rows = [r for i, ex in enumerate(examples[lo:lo + EXAMPLES_PER_BATCH])
                for r in render(tok, ex, block, f"example {lo + i + 1}")]
        T = min(block, -(-max(len(r) - 1 for r, _ in rows) // PAD_TO) * PAD_TO)
        idx = np.zeros((len(rows), T + 1), dtype=np.int32)  # padding (id 0) is after each row: never read
        mask = np.zeros((len(rows), T), dtype=bool)  # targets that are ending tokens
        for k, (r, n_end) in enumerate(rows):
            idx[k, :len(r)] = r
            mask[k, len(r) - 1 - n_end:len(r) - 1] = True
        losses = model.token_losses(idx[:, :-1], idx[:, 1:]).astype(np.float64)
        s = (losses * mask).sum(axis=1)
        n = len(rows) // ENDINGS
        sums[lo:lo + n] = s.reshape(n, ENDINGS)
        means[lo:lo + n] = (s / mask.sum(axis=1)).reshape(n, ENDINGS)
        if progress is not None:
            progress(lo + n, len(examples))
    labels = np.array([ex.label for ex in examples])
    return TaskResult(len(examples), float(np.mean(sums.argmin(axis=1) == labels)),
                      float(np.mean(means.argmin(axis=1) == labels)), sums, means)
