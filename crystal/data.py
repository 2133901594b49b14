"""Tokens and batches: the byte tokenizer, the embedded corpus, and the BatchIterator.

The token stream is cut into windows of T+1 tokens that overlap by one (window k starts at
k*T), so every token after the first is a target exactly once per epoch. Each epoch visits
the windows in a fresh order drawn from a generator seeded by (seed, epoch); batches of B
windows are taken in that order and the last partial batch is dropped. The iterator's whole
state is (epoch, cursor), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.errors import CrystalError

DEFAULT_CORPUS = Path(__file__).parent / "assets" / "tinyshakespeare.txt.xz"
DEFAULT_CORPUS_NAME = "Tiny Shakespeare (embedded)"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless for any input."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")


def default_corpus() -> bytes:
    """The embedded Tiny Shakespeare text (1,115,394 bytes, xz-compressed in the package)."""
    return lzma.decompress(DEFAULT_CORPUS.read_bytes())


def load_tokens(path: str | None) -> tuple[np.ndarray, str]:
    """Token ids and a description of their source: a text file (bytes), or the default corpus."""
    tok = ByteTokenizer()
    if path is None:
        return tok.encode(default_corpus()), DEFAULT_CORPUS_NAME
    p = Path(path)
    if not p.exists():
        raise CrystalError(f"data file not found: {p}")
    if p.is_dir():
        raise CrystalError(f"--data {p} is a directory; give a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CrystalError(f"cannot read data file {p}: {e.strerror or e}") from None
    if not data:
        raise CrystalError(f"data file {p} is empty")
    return tok.encode(data), str(p)


@dataclass(frozen=True)
class Position:
    """Where the iterator stands: the next batch is batch `cursor` of epoch `epoch`."""

    epoch: int = 0
    cursor: int = 0


class BatchIterator:
    """Shuffled [B, T] (inputs, targets) batches of int32 token ids from one token stream."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 vocab_size: int | None = None):
        tokens = np.asarray(tokens)
        self.B, self.T, self.seed = batch_size, seq_len, seed
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            need = batch_size * seq_len + 1
            raise CrystalError(f"data has {len(tokens)} tokens; one batch of {batch_size} x "
                               f"{seq_len} tokens needs at least {need} (use less --batch-size or --seq-len)")
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise CrystalError(f"data holds token id {int(tokens.max())}, outside the vocabulary "
                               f"of {vocab_size}")
        self.tokens = tokens
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self.position = Position()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _window_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        epoch, cursor = self.position.epoch, self.position.cursor
        windows = self._window_order(epoch)[cursor * self.B:(cursor + 1) * self.B]
        rows = self.tokens[(windows * self.T)[:, None] + self._offsets].astype(np.int32)
        cursor += 1
        if cursor == self.batches_per_epoch:
            epoch, cursor = epoch + 1, 0
        self.position = Position(epoch, cursor)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def state(self) -> dict:
        return {"epoch": self.position.epoch, "cursor": self.position.cursor}

    def set_state(self, state: dict) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not (0 <= cursor < self.batches_per_epoch):
            raise CrystalError(f"data position {state} does not fit this data set")
        self.position = Position(epoch, cursor)
