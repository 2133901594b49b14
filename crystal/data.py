"""Tokens and batches: tokenizers, token files, prepared data sets and the BatchIterator.

Data flows text -> tokens -> token files (`crystal prepare`) -> DataSet -> BatchIterator.

Tokenizers: `bytes` (UTF-8 bytes, vocabulary 256, the default), `bpe` (byte-level BPE trained
offline with the `tokenizers` library), or a given Hugging Face `tokenizer.json` (`hf`: e.g. a
released GPT-2's, to fine-tune it). All are written as a `tokenizer.json`; a given one verbatim.

Token file: a 32-byte little-endian header, then the ids:
    magic b"CRYSTOK1" | version u32 = 1 | itemsize u32 (2: uint16, 4: uint32) |
    count u64 | vocab_size u32 | 4 zero bytes
uint16 when the vocabulary fits (<= 65,536), else uint32. Readers check every field, the exact
file size and that every id is below vocab_size.

A prepared directory holds train.bin, val.bin, tokenizer.json and meta.json. A plain text
file (or the embedded corpus) is prepared on the fly with the byte tokenizer; its last
`val_fraction` of tokens is the validation split, as nanoGPT does.

BatchIterator: the token stream is cut into windows of T+1 tokens that overlap by one (window
k starts at k*T), so every token after the first is a target exactly once per epoch. Each
epoch visits the windows in a fresh order drawn from a generator seeded by (seed, epoch);
batches of B windows are taken in that order and the last partial batch is dropped. The
iterator's whole state is (epoch, cursor), so a resumed run sees exactly the batches it would
have seen.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_regular
from crystal.errors import CrystalError
from crystal.jsonio import read_json

DEFAULT_CORPUS = Path(__file__).parent / "assets" / "tinyshakespeare.txt.xz"
DEFAULT_CORPUS_NAME = "Tiny Shakespeare (embedded)"
TOKEN_MAGIC = b"CRYSTOK1"
TOKEN_VERSION = 1
TOKEN_HEADER = struct.Struct("<8sIIQI4x")  # 32 bytes
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
EOT = "<|endoftext|>"
MAX_VOCAB = 1 << 24  # crystal.config.MODEL_LIMITS["vocab_size"]


# --- tokenizers ---------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values onto printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless for any input."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same mapping as a Hugging Face tokenizer (BPE without merges over byte symbols)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()


class BPETokenizer:
    """A `tokenizers` library tokenizer: a byte-level BPE (GPT-2 style) trained here (kind "bpe"),
    or one read from a tokenizer.json (kind "hf"), whose text `to_json` gives back verbatim."""

    def __init__(self, tok, kind: str = "bpe", source: str | None = None):
        self.tok, self.kind, self.source = tok, kind, source
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_chunks(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str, kind: str = "bpe", where: str = "tokenizer.json") -> "BPETokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text), kind, text)
        except Exception as e:  # the library raises its own exception types
            raise CrystalError(f"invalid {where} ({str(e).splitlines()[0][:200]})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """A tokenizer.json file, or the one in a directory (a Hugging Face model directory)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.exists():
            raise CrystalError(f"--tokenizer {path}: the directory has no {TOKENIZER_FILE}" if path.is_dir() else
                               f"--tokenizer {path}: not bytes, bpe, a tokenizer.json file or a directory holding one")
        check_regular(file)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CrystalError(f"cannot read {file}: {e}") from None
        return cls.from_json(text, "hf", str(file))

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = _utf8(text, "input")
        ids = self.tok.encode(text, add_special_tokens=False).ids  # the text's tokens, no template
        return np.asarray(ids, dtype=np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def encode_many(self, texts: list[str]) -> np.ndarray:
        pieces = self.tok.encode_batch(list(_chunks(texts)), add_special_tokens=False)
        out = [np.asarray(e.ids, dtype=np.uint32) for e in pieces]
        ids = np.concatenate(out) if out else np.empty(0, np.uint32)
        return ids.astype(np.uint16) if self.vocab_size <= 65536 else ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.source if self.source is not None else self.tok.to_str()


def _chunks(texts: list[str], size: int = 1 << 16):
    """Texts cut into pieces of about `size` characters for fast batch encoding, each cut just
    after a newline that has non-space characters on both sides: GPT-2's pre-tokenizer splits
    there whatever surrounds it (a lone newline between words is a piece of its own), so the
    pieces encode to exactly the ids of the whole text."""
    for text in texts:
        start = 0
        while start < len(text):
            end = _cut_after(text, start + size)
            yield text[start:end]
            start = end


def _cut_after(text: str, at: int) -> int:
    """The end of the first "x\ny" newline (x, y not spaces) at or after `at`, else len(text)."""
    while (i := text.find("\n", at)) >= 0:
        if 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        at = i + 1
    return len(text)


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CrystalError(f"{name} is not UTF-8 text (byte {e.start}); use --tokenizer bytes") from None


def load_tokenizer(directory: Path, kind: str):
    if kind == "bytes":
        return ByteTokenizer()
    path = Path(directory) / TOKENIZER_FILE
    check_regular(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrystalError(f"cannot read {path}: {e}") from None
    return BPETokenizer.from_json(text, kind, str(path))


# --- token files ---------------------------------------------------------------------------------

def token_dtype(vocab_size: int):
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def write_tokens(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise CrystalError(f"token id {int(tokens.max())} is outside the vocabulary of {vocab_size}")
    header = TOKEN_HEADER.pack(TOKEN_MAGIC, TOKEN_VERSION, dtype.itemsize, tokens.size, vocab_size)
    atomic_write_bytes(path, header + tokens.astype(dtype).tobytes())


def read_tokens(path: str | Path) -> tuple[np.ndarray, int]:
    """(ids, vocab_size) of a token file, after checking its header, size and ids."""
    path = Path(path)
    check_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(TOKEN_HEADER.size)
    except FileNotFoundError:
        raise CrystalError(f"token file not found: {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read token file {path}: {e.strerror or e}") from None
    if len(head) < TOKEN_HEADER.size:
        raise CrystalError(f"{path}: truncated token file header ({size} bytes)")
    magic, version, itemsize, count, vocab = TOKEN_HEADER.unpack(head)
    if magic != TOKEN_MAGIC:
        raise CrystalError(f"{path}: not a crystal token file (bad magic)")
    if version != TOKEN_VERSION:
        raise CrystalError(f"{path}: token file version {version} is not supported")
    if itemsize not in (2, 4) or vocab < 1 or token_dtype(vocab).itemsize != itemsize:
        raise CrystalError(f"{path}: corrupt token file header (itemsize {itemsize}, vocab {vocab})")
    if size != TOKEN_HEADER.size + count * itemsize:
        raise CrystalError(f"{path}: truncated or padded token file (header says {count} tokens, "
                           f"file has {size - TOKEN_HEADER.size} bytes of ids)")
    ids = np.fromfile(path, dtype=token_dtype(vocab), count=count, offset=TOKEN_HEADER.size)
    if ids.size and int(ids.max()) >= vocab:
        raise CrystalError(f"{path}: token id {int(ids.max())} is outside the vocabulary of {vocab}")
    return ids, vocab


# --- data sets ---------------------------------------------------------------------------------

@dataclass
class DataSet:
    train: np.ndarray
    val: np.ndarray
    tokenizer: object  # ByteTokenizer or BPETokenizer
    vocab_size: int
    name: str
    val_bytes: int  # UTF-8 bytes the val tokens stand for (bits per byte)
    sha256: str = ""  # of the token ids, train then val (train.json keeps it: changed data is reported)

    @property
    def bytes_per_token(self) -> float:
        return self.val_bytes / len(self.val) if len(self.val) else 1.0


def tokens_sha256(*arrays: np.ndarray) -> str:
    """sha256 of token ids as little-endian uint32, whatever width they are stored at."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a, dtype="<u4").tobytes())
    return h.hexdigest()


def default_corpus() -> bytes:
    """The embedded Tiny Shakespeare text (1,115,394 bytes, xz-compressed in the package)."""
    return lzma.decompress(DEFAULT_CORPUS.read_bytes())


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - f) of the tokens for training, the last f for validation."""
    if not (0 <= val_fraction < 1):
        raise CrystalError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]


def _read_input(path: Path) -> bytes:
    if not path.exists():
        raise CrystalError(f"data file not found: {path}")
    if path.is_dir():
        raise CrystalError(f"{path} is a directory without {META_FILE}; give a text file or a "
                           "directory made by crystal prepare")
    check_regular(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CrystalError(f"cannot read data file {path}: {e.strerror or e}") from None
    if not data:
        raise CrystalError(f"data file {path} is empty")
    return data


def load_dataset(path: str | None, val_fraction: float = 0.1) -> DataSet:
    """A prepared directory, a text file (bytes), or None for the embedded corpus."""
    if path is not None and (Path(path) / META_FILE).exists():
        return load_prepared(Path(path))
    tok = ByteTokenizer()
    if path is None:
        data, name = default_corpus(), DEFAULT_CORPUS_NAME
    else:
        data, name = _read_input(Path(path)), str(path)
    train, val = split(tok.encode(data), val_fraction)
    return DataSet(train, val, tok, tok.vocab_size, name, len(val), tokens_sha256(train, val))


def load_prepared(directory: Path) -> DataSet:
    check_regular(directory / META_FILE)
    try:
        meta = read_json(directory / META_FILE)
        kind, vocab, val_bytes = meta["tokenizer"], meta["vocab_size"], meta["val_bytes"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (vocab, val_bytes)):
            raise ValueError(f"vocab_size and val_bytes must be whole numbers, got {vocab!r}, {val_bytes!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CrystalError(f"{directory / META_FILE}: not a valid data set description ({e})") from None
    if kind not in ("bytes", "bpe", "hf"):
        raise CrystalError(f"{directory / META_FILE}: unknown tokenizer {kind!r}")
    train, v1 = read_tokens(directory / "train.bin")
    val, v2 = read_tokens(directory / "val.bin")
    if v1 != vocab or v2 != vocab:
        raise CrystalError(f"{directory}: token files disagree with meta.json on the vocabulary size")
    tok = load_tokenizer(directory, kind)
    if tok.vocab_size != vocab:
        raise CrystalError(f"{directory}: tokenizer.json has {tok.vocab_size} tokens, meta.json {vocab}")
    return DataSet(train, val, tok, vocab, str(directory), val_bytes, tokens_sha256(train, val))


PREPARED_FILES = {"train.bin", "val.bin", TOKENIZER_FILE, META_FILE}


def _check_prepare_out(out: Path) -> None:
    """--out is new, empty, or an earlier prepared data set (which it replaces): never a run's or
    anyone else's directory, whose files it would overwrite."""
    if out.exists() and not out.is_dir():
        raise CrystalError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # a killed write's
        if foreign or (any(out.iterdir()) and not (out / META_FILE).exists()):
            raise CrystalError(f"--out {out} holds files that are not a prepared data set "
                               f"({(foreign or sorted(p.name for p in out.iterdir()))[0]}, ...); "
                               "choose a new or empty directory")


def prepare(inputs: list[str], out: str, tokenizer: str = "bytes", vocab_size: int = 1024,
            val_fraction: float = 0.1) -> dict:
    """Tokenize text files into a prepared directory; returns its meta.json contents.
    tokenizer: "bytes", "bpe" (trained here, vocab_size tokens), or the path of a tokenizer.json
    or of a directory holding one (its own vocabulary; written to `out` verbatim)."""
    if not inputs:
        raise CrystalError("give at least one input file")
    _check_prepare_out(Path(out))
    given = None if tokenizer in ("bytes", "bpe") else BPETokenizer.from_file(tokenizer)
    if given is not None and given.vocab_size > MAX_VOCAB:
        raise CrystalError(f"{tokenizer}: {given.vocab_size} tokens, above crystal's limit of {MAX_VOCAB}")
    raw = [_read_input(Path(p)) for p in inputs]
    if tokenizer == "bytes":
        tok = ByteTokenizer()
        ids = tok.encode(b"".join(raw))
    else:
        if given is None and not (256 < vocab_size <= MAX_VOCAB):
            raise CrystalError(f"--vocab-size for bpe must be in (256, {MAX_VOCAB}], got {vocab_size}")
        texts = [_utf8(d, p) for d, p in zip(raw, inputs)]
        tok = given or BPETokenizer.train(texts, vocab_size)
        ids = tok.encode_many(texts)
    train, val = split(ids, val_fraction)
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CrystalError(f"cannot create {out_dir}: {e.strerror or e}") from None
    write_tokens(out_dir / "train.bin", train, tok.vocab_size)
    write_tokens(out_dir / "val.bin", val, tok.vocab_size)
    atomic_write_text(out_dir / TOKENIZER_FILE, tok.to_json())
    meta = {
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
        "train_tokens": int(train.size), "val_tokens": int(val.size),
        "val_bytes": len(tok.decode(val).encode("utf-8")) if val.size else 0,
        "sources": [str(p) for p in inputs], "val_fraction": val_fraction,
    }
    if given is not None:
        meta["tokenizer_from"] = str(tokenizer)
    atomic_write_json(out_dir / META_FILE, meta)
    return meta


# --- batches ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    """Where the iterator stands: the next batch is batch `cursor` of epoch `epoch`."""

    epoch: int = 0
    cursor: int = 0


class BatchIterator:
    """Shuffled [B, T] (inputs, targets) batches of int32 token ids from one token stream."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 vocab_size: int | None = None, what: str = "data"):
        tokens = np.asarray(tokens)
        self.B, self.T, self.seed = batch_size, seq_len, seed
        # Epoch e cuts the stream into windows at its own seeded phase in [0, T): window k starts
        # at phase + k*T. Successive epochs then see differently aligned windows, not the same
        # sequences again (which a model soon memorizes). Shifting costs the last window; a
        # stream with no window to spare keeps phase 0.
        whole = max(0, (len(tokens) - 1) // seq_len)
        self.shifted = whole - 1 >= batch_size
        self.n_windows = whole - 1 if self.shifted else whole
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            need = batch_size * seq_len + 1
            raise CrystalError(f"{what} has {len(tokens)} tokens; one batch of {batch_size} x "
                               f"{seq_len} tokens needs at least {need} (use less --batch-size or --seq-len)")
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise CrystalError(f"{what} holds token id {int(tokens.max())}, outside the vocabulary "
                               f"of {vocab_size}")
        self.tokens = tokens
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self.position = Position()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _window_starts(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s window start offsets, in its shuffled order."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            phase = int(rng.integers(self.T)) if self.shifted else 0
            self._order = phase + rng.permutation(self.n_windows) * self.T
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        epoch, cursor = self.position.epoch, self.position.cursor
        starts = self._window_starts(epoch)[cursor * self.B:(cursor + 1) * self.B]
        rows = self.tokens[starts[:, None] + self._offsets].astype(np.int32)
        cursor += 1
        if cursor == self.batches_per_epoch:
            epoch, cursor = epoch + 1, 0
        self.position = Position(epoch, cursor)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def state(self) -> dict:
        return {"epoch": self.position.epoch, "cursor": self.position.cursor}

    def set_state(self, state: dict) -> None:
        try:
            epoch, cursor = state["epoch"], state["cursor"]
        except (KeyError, TypeError):
            raise CrystalError(f"invalid data position {state!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, cursor)):
            raise CrystalError(f"invalid data position {state!r}: epoch and cursor must be whole numbers")
        if epoch < 0 or not (0 <= cursor < self.batches_per_epoch):
            raise CrystalError(f"data position {state} does not fit this data set")
        self.position = Position(epoch, cursor)


def eval_batches(val: np.ndarray, batch_size: int, seq_len: int, seed: int, count: int) -> list:
    """The fixed validation set: the first `count` batches (at most one epoch) of the val split."""
    it = BatchIterator(val, batch_size, seq_len, seed, what="the validation split")
    return [it.next_batch() for _ in range(min(count, it.batches_per_epoch))]


def run_tokenizer(run: Path):
    """The tokenizer a run was trained with: its tokenizer.json (a byte tokenizer is one too,
    a BPE without merges), or bytes when there is none."""
    has_json = (Path(run) / TOKENIZER_FILE).exists()
    return load_tokenizer(run, "bpe" if has_json else "bytes")
