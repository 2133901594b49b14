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

A file is read, checked and tokenized once (load_task: a Task of rows); score() runs its batches
of EXAMPLES_PER_BATCH examples through any token_losses function: a GPT's (crystal eval), or,
during training, the spheres' weights on the root thread (crystal.spheres.SphereSystem.scorer,
crystal.trainer.score_task: each rank its share of the batches, the hits summed).
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
    hits: int  # examples whose lowest summed loss is the label (acc = hits / examples)
    hits_norm: int  # ... whose lowest mean loss is (acc_norm)


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


@dataclass(frozen=True)
class Task:
    """A task file's examples tokenized once into rows (a training run scores it many times)."""
    name: str  # the file's name, as metrics.jsonl records it
    block_size: int
    rows: list[list[tuple[np.ndarray, int]]]  # per example, render()'s 4 (ids, ending length)
    labels: np.ndarray  # [examples] int

    @property
    def batches(self) -> int:
        return -(-len(self.rows) // EXAMPLES_PER_BATCH)


def load_task(path: str | Path, tok, block_size: int, limit: int | None = None) -> Task:
    """The first `limit` (None: all) examples of a task file, checked and tokenized (tokenize)."""
    return tokenize(path, read_task(path)[:limit], tok, block_size)


def tokenize(path: str | Path, examples: list[Example], tok, block_size: int) -> Task:
    """The examples of task file `path` as rows of `tok`'s ids (None: token shards that name no
    tokenizer, refused)."""
    if tok is None:
        raise CrystalError(f"the task {path} is text and the data names no tokenizer (token shards): train on a "
                           "prepared directory, or --init-from a model with a tokenizer.json")
    rows = [render(tok, ex, block_size, f"{path} example {i + 1}") for i, ex in enumerate(examples)]
    return Task(Path(path).name, block_size, rows, np.array([ex.label for ex in examples], dtype=np.int64))


def score(token_losses, task: Task, progress=None, batches: range | None = None) -> TaskResult:
    """The task's examples scored by `token_losses(idx, targets) -> [B, T] losses` (a
    crystal.model.GPT's, either backend, or a training run's, crystal.spheres.SphereSystem.scorer),
    EXAMPLES_PER_BATCH examples a forward pass: batch b holds examples b*E ... b*E + E-1, so a
    share of `batches` (a rank's; None: all) scores its examples exactly as a whole run does.
    progress(done, total) after each batch."""
    batches = range(task.batches) if batches is None else batches
    lo_ex = batches.start * EXAMPLES_PER_BATCH
    hi_ex = min(len(task.rows), batches.stop * EXAMPLES_PER_BATCH)
    n_ex = max(0, hi_ex - lo_ex)
    sums, means = np.zeros((n_ex, ENDINGS)), np.zeros((n_ex, ENDINGS))
    for lo in range(lo_ex, hi_ex, EXAMPLES_PER_BATCH):
        rows = [r for ex in task.rows[lo:min(lo + EXAMPLES_PER_BATCH, hi_ex)] for r in ex]
        T = min(task.block_size, -(-max(len(r) - 1 for r, _ in rows) // PAD_TO) * PAD_TO)
        idx = np.zeros((len(rows), T + 1), dtype=np.int32)  # padding (id 0) is after each row: never read
        mask = np.zeros((len(rows), T), dtype=bool)  # targets that are ending tokens
        for k, (r, n_end) in enumerate(rows):
            idx[k, :len(r)] = r
            mask[k, len(r) - 1 - n_end:len(r) - 1] = True
        losses = np.asarray(token_losses(idx[:, :-1], idx[:, 1:]), dtype=np.float64)
        s = (losses * mask).sum(axis=1)
        n = len(rows) // ENDINGS
        sums[lo - lo_ex:lo - lo_ex + n] = s.reshape(n, ENDINGS)
        means[lo - lo_ex:lo - lo_ex + n] = (s / mask.sum(axis=1)).reshape(n, ENDINGS)
        if progress is not None:
            progress(lo + n - lo_ex, n_ex)
    labels = task.labels[lo_ex:hi_ex]
    hits = int(np.sum(sums.argmin(axis=1) == labels)), int(np.sum(means.argmin(axis=1) == labels))
    return TaskResult(n_ex, hits[0] / max(1, n_ex), hits[1] / max(1, n_ex), sums, means, *hits)
