"""Tokens and batches: tokenizers, token files, prepared data sets and the BatchIterator.

Data flows text -> tokens -> token files (`crystal prepare`) -> DataSet -> BatchIterator.

Tokenizers: `bytes` (UTF-8 bytes, vocabulary 256, the default), `bpe` (byte-level BPE trained
offline with the `tokenizers` library), or a given Hugging Face `tokenizer.json` (`hf`: e.g. a
released GPT-2's, to fine-tune it). All are written as a `tokenizer.json`; a given one verbatim.

Token files (crystal.shards): crystal's (a 32-byte header: magic, version, itemsize, count,
vocab_size; uint16 ids when the vocabulary fits in 65,536, else uint32) and llm.c's (a 1024-byte
header; uint16 or uint32 ids). Readers check the header and the exact file size, and map the ids
(np.memmap): a run's resident data is what its batches touch. Every id below the vocabulary is
checked where the tokens are made (prepare), by `crystal data verify`, and in each batch.

A prepared directory holds its token shards (train.bin and val.bin, or train_000000.bin, ... with
--shard-tokens), tokenizer.json and meta.json, written as a whole (a sibling directory renamed
into place). meta.json lists each split's shards with their token counts and sampled sha256
(header, size and 8 blocks: checked at load without reading every id) and the sha256 of all the
tokens (the data's fingerprint in train.json; `crystal data verify` recomputes it); its
tokenizer identity ties them to the tokenizer (`tokenizer_identity`). Token shards may also be
named directly (--data a token file or a glob, --val-data another). A plain text file (or the
embedded corpus) is prepared on the fly with the byte tokenizer; the last `val_fraction` of the
tokens of a text file or of named shards is the validation split, as nanoGPT does.

BatchIterator: the token stream (shards read as one, a window may cross from one into the next)
is cut into windows of T+1 tokens that overlap by one (window k starts at phase + k*T), so every
token after the first is a target exactly once per epoch. Each epoch visits the windows in a
fresh order seeded by (seed, epoch) (crystal.shards.WindowOrder: computed per position, no array
of every window); batches of B windows are taken in that order and the last partial batch is
dropped. The iterator's whole state is (epoch, cursor), so a resumed run sees exactly the batches
it would have seen.

Instruction data (crystal.instruct, `prepare --format alpaca|chat`) adds a loss mask beside each
token shard (train.mask beside train.bin, train_000000.mask beside train_000000.bin): one byte a
token, 1 where the token is a response token (a target of the loss), 0 on prompt tokens, mapped
as the ids are (crystal.shards.open_mask_file). meta.json gives each shard's mask and its sampled
sha256, and the sha256 of every mask byte (masks_sha256: part of the data's fingerprint, checked
whole by `crystal data verify`). The iterator takes a batch's mask rows by the same windows and
serves a masked target as IGNORE (-1), which the cross-entropy ops skip.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from crystal.atomic import (atomic_write_bytes, atomic_write_chunks, atomic_write_json, atomic_write_text, check_regular,
                            fsync_dir)
from crystal.errors import CrystalError
from crystal.jsonio import read_json
from crystal.shards import (DATA_ORDER, SCAN_TOKENS, TOKEN_HEADER, TOKEN_MAGIC,
                            TOKEN_VERSION, TokenFile, TokenStream, WindowOrder, is_token_file, map_tokens, open_mask_file,
                            open_token_file, sample_sha256, scan_ids, token_dtype, tokens_sha256)

DEFAULT_CORPUS = Path(__file__).parent / "assets" / "tinyshakespeare.txt.xz"
DEFAULT_CORPUS_NAME = "Tiny Shakespeare (embedded)"
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
        # A token stream is the whole text's ids: a tokenizer.json's truncation or padding (made for
        # model inputs of one length) would cut or pad every piece; to_json still gives them back.
        tok.no_truncation()
        tok.no_padding()
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, names: list[str] | None = None) -> "BPETokenizer":
        names = names or ["input"] * len(texts)
        return cls.train_on(lambda cutter: (p for t, n in zip(texts, names) for p in cutter.pieces(t, n)), vocab_size)

    @classmethod
    def train_on(cls, pieces, vocab_size: int) -> "BPETokenizer":
        """A byte-level BPE of `vocab_size` tokens (<|endoftext|> the first) trained on the text
        pieces that `pieces(cutter)` yields: a stream, so the text need not fit in memory."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        # Cut where the pre-tokenizer proves a boundary (the counts are the whole texts'), with a
        # stand-in that gives each piece one id: the tokenizer in training cannot encode meanwhile.
        stand_in = Tokenizer(models.WordLevel({"piece": 0}, unk_token="piece"))
        stand_in.pre_tokenizer = tok.pre_tokenizer
        tok.train_from_iterator(pieces(Cutter(stand_in)), trainer=trainer)
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
        return np.asarray(ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return self.source if self.source is not None else self.tok.to_str()


# --- cutting a text where the tokenizer's own pre-tokenization proves a boundary ---------------------
#
# `tokenizers` encodes a text as: split off the added tokens (e.g. <|endoftext|>), normalize each
# segment, pre-tokenize it into pieces, and run the model (BPE, ...) on each piece by itself. So a
# text cut at c encodes, piece after piece, to exactly the whole text's ids when (1) the
# normalizer maps x + y to normalize(x) + normalize(y), (2) no added token is matched across c,
# and (3) the pre-tokenizer gives the pieces of x, then those of y.

PIECE_CHARS = 1 << 16  # a text is encoded in pieces of about this many characters
MAX_PIECE_CHARS = 1 << 22  # the most characters encoded at once (the library takes ~250 bytes of memory each)
BATCH_CHARS = 1 << 20  # pieces encoded together (in parallel) up to this many characters
CUT_CONTEXT = 512  # characters on either side of a cut that its proof encodes
CUT_STEP = 2048  # characters searched for cuts at a time
CUT_TRIES = 4  # candidate cuts verified per CUT_STEP before moving on
# Where a cut may go: before one of these characters. Each is a starter that no Unicode
# normalization composes with what precedes it or reorders across (no canonical composition pair
# has an ASCII second character, and their combining class is 0); the per-character normalizers
# below map it to ASCII, unless a Replace or ByteLevel says otherwise (then no Unicode
# normalization may follow).
CUT_CHARS = frozenset(map(chr, range(0x20, 0x7F))) | {"\t", "\n", "\r"}
_PER_CHARACTER = {"Lowercase", "StripAccents", "Nmt"}  # map each character by itself
_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD", "BertNormalizer"}  # local before a CUT_CHARS character


def _normalizer_steps(spec) -> list:
    if isinstance(spec, dict) and spec.get("type") == "Sequence":
        return [step for s in spec.get("normalizers") or [] for step in _normalizer_steps(s)]
    return [] if spec is None else [spec]


def _local_normalizer(spec) -> bool:
    """Whether a normalizer (as tokenizer.json writes it) maps x + y to normalize(x) +
    normalize(y) whenever y starts with a CUT_CHARS character: per-character maps, one-character
    Replaces and the Unicode normalization forms do. Strip, Prepend, Precompiled, a Replace of a
    longer string or a regex (which may match across the cut) and other kinds are not known to."""
    remapped = False  # an earlier step may have mapped the character at the cut outside CUT_CHARS
    for step in _normalizer_steps(spec):
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Replace":
            pattern, content = (step.get("pattern") or {}).get("String"), step.get("content")
            if not (isinstance(pattern, str) and len(pattern) == 1 and isinstance(content, str)):
                return False
            remapped |= pattern in CUT_CHARS and content[:1] not in CUT_CHARS
        elif kind == "ByteLevel":
            remapped = True  # " " -> "Ġ", ...
        elif kind in _UNICODE_FORMS:
            if remapped:
                return False
        elif kind not in _PER_CHARACTER:
            return False
    return True


class Cutter:
    """Cuts texts into pieces of about PIECE_CHARS (at most MAX_PIECE_CHARS) characters that a
    `tokenizers.Tokenizer` encodes, one after another, to exactly the ids of the whole text.

    Candidate cuts are the boundaries between the pre-tokenizer's pieces (after the normalizer).
    One is taken only where (1) the normalizer is local (`_local_normalizer`) and the character at
    the cut is in CUT_CHARS; (2) no added token occurs across the cut, in the text or in the
    normalized text (so none is matched across it), and, if an added token strips whitespace,
    neither side of the cut is whitespace alone for CUT_CONTEXT characters; (3) the CUT_CONTEXT
    characters either side encode to the same ids cut there as whole. (3) stands for the whole
    text where the pre-tokenizer's decision at the cut depends on less context than that: true of
    GPT-2's and the library's other pre-tokenizers, whose pieces are words, numbers, punctuation
    and whitespace runs, each ended by its neighbours. A text with no such cut within
    MAX_PIECE_CHARS is encoded whole if it is no longer than that, else refused."""

    def __init__(self, tok):
        self.tok = tok
        state = tok.normalizer.__getstate__() if tok.normalizer is not None else None
        self.normalizer = json.loads(state) if state is not None else None
        self.local = _local_normalizer(self.normalizer)
        added = tok.get_added_tokens_decoder().values()
        self.added = [a.content for a in added if a.content]
        self.strips = any(a.lstrip or a.rstrip for a in added)

    def pieces(self, text: str, name: str):
        return self.stream((text,), name)

    def stream(self, chunks, name: str):
        """The pieces of the text that `chunks` (an iterable of str) hold one after another, the
        same pieces as of the text whole: a cut searched from `start` reads the text up to
        start + MAX_PIECE_CHARS + CUT_CONTEXT (the last candidate and the context its proof
        encodes), so that much is read ahead before each search; never more than about twice it
        is held."""
        need = MAX_PIECE_CHARS + CUT_CONTEXT
        chunks, text, start, skipped, ended = iter(chunks), "", 0, 0, False
        while True:
            if not ended and len(text) - start < need:
                parts, n = [text[start:]], len(text) - start
                for c in chunks:
                    parts.append(c)
                    n += len(c)
                    if n >= need:
                        break
                else:
                    ended = True
                skipped += start
                text, start = "".join(parts), 0
            if len(text) - start <= PIECE_CHARS:
                break
            cut = self._cut(text, start + PIECE_CHARS, start + MAX_PIECE_CHARS) if self.local else None
            if cut is None:
                if ended and len(text) - start <= MAX_PIECE_CHARS:
                    break
                raise CrystalError(self._refusal(text, start, name, skipped))
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _refusal(self, text: str, start: int, name: str, skipped: int = 0) -> str:
        limit = f"crystal encodes at most {MAX_PIECE_CHARS:,} characters at once; split the input into smaller files"
        if not self.local:
            kinds = "+".join(str(s.get("type")) for s in _normalizer_steps(self.normalizer))
            return (f"{name}: {len(text):,} characters, and the tokenizer's normalizer ({kinds}) may join "
                    f"characters across any cut, so the text can only be encoded whole; {limit}")
        return (f"{name}: no token boundary that the tokenizer's pre-tokenizer proves between characters "
                f"{skipped + start + PIECE_CHARS:,} and {skipped + min(len(text), start + MAX_PIECE_CHARS):,}; {limit}")

    def _boundaries(self, text: str) -> list[int]:
        """Where one of the pre-tokenizer's pieces of `text` (normalized) starts and none goes on,
        as offsets in `text`."""
        from tokenizers import PreTokenizedString

        pts = PreTokenizedString(text)
        if self.tok.normalizer is not None:
            pts.normalize(self.tok.normalizer.normalize)
        if self.tok.pre_tokenizer is not None:
            self.tok.pre_tokenizer.pre_tokenize(pts)
        spans = [span for _, span, _ in pts.get_splits(offset_referential="original", offset_type="char")]
        inside = {p for s, e in spans for p in range(s + 1, e)}
        return sorted({s for s, _ in spans if s not in inside})

    def _cut(self, text: str, at: int, limit: int) -> int | None:
        """The first proven cut in [at, limit), or None."""
        for lo in range(at, min(limit, len(text)), CUT_STEP):
            hi = min(lo + CUT_STEP, limit, len(text))
            base = max(0, lo - CUT_CONTEXT)
            candidates = [base + p for p in self._boundaries(text[base:hi + CUT_CONTEXT])
                          if lo <= base + p < hi and text[base + p] in CUT_CHARS]
            for c in candidates[:CUT_TRIES]:
                if self._proven(text, c):
                    return c
        return None

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _proven(self, text: str, c: int) -> bool:
        left, right = text[max(0, c - CUT_CONTEXT):c], text[c:c + CUT_CONTEXT]
        if self.added:
            n = self.tok.normalizer.normalize_str if self.tok.normalizer is not None else None
            sides = [(left, right)] + ([(n(left), n(right))] if n else [])
            for a in self.added:  # one across the cut lies in the len(a) - 1 characters either side
                if len(a) > 1 and any(a in x[max(0, len(x) - len(a) + 1):] + y[:len(a) - 1] for x, y in sides):
                    return False
            if self.strips and (not left.strip() or not right.strip()):
                return False
        return self._ids(left + right) == self._ids(left) + self._ids(right)


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


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what decides a text's ids: the model (vocabulary, merges and options), the
    normalizer, the pre-tokenizer and the added tokens (id, content and how they are matched), as
    the `tokenizers` library serializes them (so the file's spacing and key order, and the
    decoder, post-processor, truncation and padding, do not count). `tokenizer`: a
    `tokenizers.Tokenizer`, or a ByteTokenizer or BPETokenizer. prepare records it in meta.json;
    fine-tuning compares it with the model's."""
    from tokenizers import Tokenizer

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = getattr(tokenizer, "tok", None) or Tokenizer.from_str(tokenizer.to_json())
    spec = json.loads(tokenizer.to_str())
    model = dict(spec["model"])
    if isinstance(model.get("merges"), list):  # "a b" (tokenizers < 0.20) and ["a", "b"] are one merge
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    added = sorted(({k: t.get(k) for k in ("id", "content", "single_word", "lstrip", "rstrip", "normalized")}
                    for t in spec.get("added_tokens") or []), key=lambda t: t["id"])
    part = {"model": model, "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
            "added_tokens": added}
    return hashlib.sha256(json.dumps(part, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


# --- token files ---------------------------------------------------------------------------------

def write_tokens(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise CrystalError(f"token id {int(tokens.max())} is outside the vocabulary of {vocab_size}")
    header = TOKEN_HEADER.pack(TOKEN_MAGIC, TOKEN_VERSION, dtype.itemsize, tokens.size, vocab_size)
    atomic_write_bytes(path, header + tokens.astype(dtype).tobytes())


def read_tokens(path: str | Path) -> tuple[np.ndarray, int]:
    """(ids, vocab_size) of a crystal token file, read whole into memory after checking its
    header, size and every id (tools and tests; training maps the files: `open_token_file`)."""
    tf = open_token_file(path)
    if tf.kind != "crystal":
        raise CrystalError(f"{path}: an llm.c token shard, not a crystal token file")
    ids = np.array(map_tokens(tf))
    scan_ids(ids, tf.vocab_size, str(path))
    return ids, tf.vocab_size


# --- data sets ---------------------------------------------------------------------------------

@dataclass
class DataSet:
    train: np.ndarray | TokenStream  # in memory (a text file) or memory-mapped shards
    val: np.ndarray | TokenStream
    tokenizer: object  # ByteTokenizer or BPETokenizer; None: token shards that name none
    vocab_size: int
    name: str
    val_bytes: int | None  # UTF-8 bytes the val tokens stand for (bits per byte); None: not known
    # The data's fingerprint (train.json keeps it: changed data is reported): sha256 of the token
    # ids, train then val (tokens_sha256), for a text file and a prepared directory (meta.json's,
    # computed by prepare); of the shards' headers, sizes and sampled blocks (sample_sha256) for
    # token shards named by --data / --val-data.
    sha256: str = ""
    tokenizer_identity: str = ""  # as meta.json records it; "" where it does not (then: the tokenizer's own)
    # instruction data (crystal.instruct): uint8 beside train and val (arrays or mapped streams), 1
    # where a token is a response token, the loss's targets; None: every token is a target
    train_mask: np.ndarray | TokenStream | None = None
    val_mask: np.ndarray | TokenStream | None = None

    @property
    def masked(self) -> bool:
        return self.train_mask is not None

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per target token of the val split (masked: per response token); None: not known."""
        if self.val_bytes is None:
            return None
        n = mask_count(self.val_mask) if self.val_mask is not None else len(self.val)
        return self.val_bytes / n if n else 1.0


def default_corpus() -> bytes:
    """The embedded Tiny Shakespeare text (1,115,394 bytes, xz-compressed in the package)."""
    return lzma.decompress(DEFAULT_CORPUS.read_bytes())


def split(tokens, val_fraction: float):
    """First (1 - f) of the tokens for training, the last f for validation (an array or a stream)."""
    if not (0 <= val_fraction < 1):
        raise CrystalError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    n_val = int(round(n * val_fraction))
    if isinstance(tokens, TokenStream):
        return tokens.slice(0, n - n_val), tokens.slice(n - n_val, n)
    return tokens[:n - n_val], tokens[n - n_val:]


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


GLOB_CHARS = "*?["


def shard_files(spec: str, flag: str) -> list[TokenFile] | None:
    """The token files `spec` names, headers checked: one token file, or a glob of them (in the
    order of their names: llm.c's and FineWeb's are numbered). None where `spec` names one file
    that is not a token file (a text file)."""
    path = Path(spec)
    if path.exists() or not any(c in spec for c in GLOB_CHARS):
        return [open_token_file(path)] if path.is_file() and is_token_file(path) else None
    names = sorted(glob.glob(os.path.expanduser(spec)))
    if not names:
        raise CrystalError(f"{flag} {spec}: the pattern matches no file")
    for name in names:
        if not (os.path.isfile(name) and is_token_file(Path(name))):
            raise CrystalError(f"{flag} {spec}: {name} is not a token file (crystal's or llm.c's)")
    return [open_token_file(name) for name in names]


def shard_stream(files: list[TokenFile], flag: str, vocab_size: int | None = None) -> tuple[TokenStream, int, str]:
    """(stream, vocabulary, fingerprint) of token files of one kind and vocabulary. `vocab_size`:
    llm.c shards' vocabulary (their header has none; None: the one their magic names)."""
    first = files[0]
    for tf in files[1:]:
        if (tf.kind, tf.dtype, tf.vocab_size, tf.llmc_vocab) != (first.kind, first.dtype, first.vocab_size,
                                                                  first.llmc_vocab):
            what = (f"{tf.kind}, {tf.dtype.itemsize}-byte ids, vocabulary {tf.vocab_size or tf.llmc_vocab}" for tf in (first, tf))
            raise CrystalError(f"{flag}: {tf.path} is not of the kind of {first.path} ({next(what)} vs {next(what)}); "
                               "the shards of a data set share one header kind and vocabulary")
    vocab = first.vocab_size
    if first.kind == "llm.c":
        vocab = first.llmc_vocab if vocab_size is None else vocab_size
        if not (1 <= vocab <= MAX_VOCAB):
            raise CrystalError(f"--vocab-size must be in [1, {MAX_VOCAB}], got {vocab}")
    h = hashlib.sha256(f"shards {vocab}".encode())
    for tf in files:
        h.update(bytes.fromhex(sample_sha256(tf)))
    stream = TokenStream([map_tokens(tf) for tf in files], [str(tf.path) for tf in files])
    return stream, vocab, h.hexdigest()


def load_dataset(path: str | None, val_fraction: float = 0.1, val_data: str | None = None,
                 vocab_size: int | None = None) -> DataSet:
    """A prepared directory, token shards (one token file or a glob of them, crystal's or
    llm.c's: memory-mapped, their last `val_fraction` of tokens the validation split), a text
    file (bytes), or None for the embedded corpus. `val_data`: token shards (a file or a glob)
    to validate on instead; then every token of `path` trains. `vocab_size`: the vocabulary of
    llm.c shards (None: the one their header's magic names)."""
    files = shard_files(path, "--data") if path is not None and not (Path(path) / META_FILE).exists() else None
    if path is not None and files is None and (Path(path) / META_FILE).exists():
        ds = load_prepared(Path(path))
    elif files is not None:
        stream, vocab, fingerprint = shard_stream(files, "--data", vocab_size)
        train, val = (stream, stream.slice(0, 0)) if val_data is not None else split(stream, val_fraction)
        ds = DataSet(train, val, None, vocab, path, None, fingerprint)
    else:
        tok = ByteTokenizer()
        if path is None:
            data, name = default_corpus(), DEFAULT_CORPUS_NAME
        else:
            data, name = _read_input(Path(path)), str(path)
        ids = tok.encode(data)
        train, val = (ids, ids[:0]) if val_data is not None else split(ids, val_fraction)
        ds = DataSet(train, val, tok, tok.vocab_size, name, len(val), tokens_sha256(train, val))
    if val_data is None:
        return ds
    vfiles = shard_files(val_data, "--val-data")
    if vfiles is None:
        raise CrystalError(f"--val-data {val_data}: not a token file; give token shards (a file or a glob)")
    val, vocab, fingerprint = shard_stream(vfiles, "--val-data", ds.vocab_size if vocab_size is None else vocab_size)
    if vocab != ds.vocab_size:
        raise CrystalError(f"--val-data {val_data}: vocabulary {vocab}, the training data's {ds.vocab_size}")
    sha = hashlib.sha256(f"{ds.sha256} {fingerprint}".encode()).hexdigest()
    # (the val split is then plain shards: every token a target, the val loss over all of them)
    return dataclasses.replace(ds, val=val, val_bytes=None, sha256=sha, val_mask=None)


# --- loss masks (instruction data) ---------------------------------------------------------------

def _mask_chunks(*masks):
    """The bytes of masks (arrays or streams), in order, SCAN_TOKENS at a time (bounded memory)."""
    for m in masks:
        for part in (m.parts if isinstance(m, TokenStream) else [m]):
            for lo in range(0, len(part), SCAN_TOKENS):
                yield np.asarray(part[lo:lo + SCAN_TOKENS], dtype=np.uint8)


def mask_sha256(*masks) -> str:
    """sha256 of mask bytes, one a token, of the masks in order (meta.json's masks_sha256: train then val)."""
    h = hashlib.sha256()
    for chunk in _mask_chunks(*masks):
        h.update(chunk.tobytes())
    return h.hexdigest()


def mask_count(*masks) -> int:
    """Response tokens (ones) of the masks."""
    return sum(int(np.count_nonzero(chunk)) for chunk in _mask_chunks(*masks))


def check_mask(mask, name: str) -> None:
    """Every byte of a mask (an array, a memory map) 0 or 1, or CrystalError naming the first that is not."""
    for lo in range(0, len(mask), SCAN_TOKENS):
        chunk = np.asarray(mask[lo:lo + SCAN_TOKENS])
        if chunk.size and int(chunk.max()) > 1:
            at = lo + int(np.argmax(chunk > 1))
            raise CrystalError(f"{name}: mask byte {int(mask[at])} at token {at:,} is not 0 or 1")


def data_sha256(tokens_sha: str, masks_sha: str | None) -> str:
    """What identifies a data set (train.json records it): its tokens' sha256, and with masks the
    sha256 of that and the masks' (so a changed mask is changed data)."""
    if not masks_sha:
        return tokens_sha
    return hashlib.sha256(f"{tokens_sha} masks {masks_sha}".encode()).hexdigest()


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_list(meta: dict, split_name: str, count: int) -> list[dict]:
    """meta.json's shards of a split: [{"file", "tokens", "sample_sha256"}]; a data set written
    before shards has train.bin and val.bin (no sample)."""
    key = f"{split_name}_shards"
    if key not in meta:
        return [{"file": f"{split_name}.bin", "tokens": count}]
    shards = meta[key]
    if not isinstance(shards, list):
        raise ValueError(f"{key} must be a list")
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and _whole(s.get("tokens"))
                and isinstance(s.get("sample_sha256", ""), str)):
            raise ValueError(f"{key}: each shard needs a file name, a whole number of tokens and a sample_sha256")
        if "mask" in s and not (isinstance(s["mask"], str) and isinstance(s.get("mask_sample_sha256"), str)):
            raise ValueError(f"{key}: a shard's mask needs a file name and a mask_sample_sha256")
        for f in (s["file"], s.get("mask", "x")):
            if f in ("", ".", "..") or "/" in f or "\\" in f:
                raise ValueError(f"{key}: {f!r} is not a file name in the directory")
    if sum(s["tokens"] for s in shards) != count:
        raise ValueError(f"the {key} hold {sum(s['tokens'] for s in shards):,} tokens, {split_name}_tokens says {count:,}")
    return shards


def load_prepared(directory: Path) -> DataSet:
    """A directory made by `prepare`, after checking that its files belong together: every shard
    meta.json lists has its header, the count meta.json gives, its vocabulary and its sampled
    fingerprint (sample_sha256), read without reading every id (`crystal data verify` reads
    them all). A data set written before shards (no shard lists in meta.json) is checked whole
    against its tokens_sha256, as before."""
    check_regular(directory / META_FILE)
    try:
        meta = read_json(directory / META_FILE)
        kind, vocab, val_bytes = meta["tokenizer"], meta["vocab_size"], meta["val_bytes"]
        counts = meta["train_tokens"], meta["val_tokens"]
        if not all(map(_whole, (vocab, val_bytes, *counts))):
            raise ValueError("vocab_size, val_bytes, train_tokens and val_tokens must be whole numbers, got "
                             f"{vocab!r}, {val_bytes!r}, {counts[0]!r}, {counts[1]!r}")
        recorded = {k: meta.get(k, "") for k in ("tokens_sha256", "tokenizer_identity")}
        if not all(isinstance(v, str) for v in recorded.values()):
            raise ValueError(f"tokens_sha256 and tokenizer_identity must be strings, got {recorded}")
        shards = {s: _shard_list(meta, s, c) for s, c in zip(("train", "val"), counts)}
        # instruction data: a mask beside every shard, the sha256 of all of them, the response tokens
        masks_sha = meta.get("masks_sha256")
        listed = [s for split_shards in shards.values() for s in split_shards]
        if masks_sha is not None:
            responses = meta["response_tokens"]
            if not (isinstance(masks_sha, str) and all("mask" in s for s in listed)
                    and isinstance(responses, dict) and _whole(responses.get("train"))):
                raise ValueError("masks_sha256 must be a string, with a mask beside every shard and "
                                 "response_tokens' train count")
        elif any("mask" in s for s in listed):
            raise ValueError("shards have masks but masks_sha256 is missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CrystalError(f"{directory / META_FILE}: not a valid data set description ({e})") from None
    if kind not in ("bytes", "bpe", "hf"):
        raise CrystalError(f"{directory / META_FILE}: unknown tokenizer {kind!r}")
    mixed = "; the files come from different runs of crystal prepare: prepare the data set again"
    streams, masks = {}, {}
    for split_name, listed in shards.items():
        files = [open_token_file(directory / s["file"]) for s in listed]
        for s, tf in zip(listed, files):
            if tf.kind != "crystal" or tf.vocab_size != vocab:
                raise CrystalError(f"{directory}: token files disagree with meta.json on the vocabulary size")
            if tf.count != s["tokens"]:
                raise CrystalError(f"{directory}: {s['file']} holds {tf.count:,} tokens, meta.json says "
                                   f"{s['tokens']:,}{mixed}")
            if s.get("sample_sha256") and s["sample_sha256"] != sample_sha256(tf):
                raise CrystalError(f"{directory}: the token files are not the ones meta.json describes "
                                   f"({s['file']}: its sampled sha256 differs){mixed}")
        streams[split_name] = TokenStream([map_tokens(tf) for tf in files], [str(tf.path) for tf in files])
        if masks_sha is not None:  # mapped as the ids, checked as they are: size and sampled sha256
            mfiles = [open_mask_file(directory / s["mask"], s["tokens"]) for s in listed]
            for s, mf in zip(listed, mfiles):
                if s["mask_sample_sha256"] != sample_sha256(mf):
                    raise CrystalError(f"{directory}: the mask files are not the ones meta.json describes "
                                       f"({s['mask']}: its sampled sha256 differs){mixed}")
            masks[split_name] = TokenStream([map_tokens(mf) for mf in mfiles], [str(mf.path) for mf in mfiles])
    train, val = streams["train"], streams["val"]
    sha = recorded["tokens_sha256"]
    if not sha or not any("sample_sha256" in s for s in shards["train"] + shards["val"]):
        # written before shards: the whole hash, as crystal checked it then (read in bounded chunks)
        whole = tokens_sha256(train, val)
        if sha and sha != whole:
            raise CrystalError(f"{directory}: the token files are not the ones meta.json describes (their sha256 "
                               f"differs){mixed}")
        sha = whole
    tok = load_tokenizer(directory, kind)
    if tok.vocab_size != vocab:
        raise CrystalError(f"{directory}: tokenizer.json has {tok.vocab_size} tokens, meta.json {vocab}")
    if masks_sha is not None and responses["train"] == 0:
        raise CrystalError(f"{directory}: the masks leave no response token to train on in the training split")
    return DataSet(train, val, tok, vocab, str(directory), val_bytes, data_sha256(sha, masks_sha),
                   recorded["tokenizer_identity"], masks.get("train"), masks.get("val"))


def verify(path: str | None, vocab_size: int | None = None, val_data: str | None = None) -> dict:
    """`crystal data verify`: what training does not read at startup, read now (in bounded
    chunks): every id of every shard below the vocabulary and, for a prepared directory, the
    sha256 of all its tokens against meta.json's (and of instruction data, every mask byte 0 or 1
    and the masks' sha256). Returns a summary; a failure is a CrystalError."""
    ds = load_dataset(path, 0.1, val_data, vocab_size)
    shards = 0
    for s in (ds.train, ds.val):
        stream = s if isinstance(s, TokenStream) else TokenStream([s], [ds.name])
        for part, name in zip(stream.parts, stream.names):
            scan_ids(part, ds.vocab_size, name)
            shards += 1
    checked = "every id below the vocabulary"
    masks = [m for m in (ds.train_mask, ds.val_mask) if m is not None]
    for m in masks:
        for part, name in zip(m.parts, m.names):
            check_mask(part, name)
    if masks:
        checked += ", every mask byte 0 or 1"
    if path is not None and (Path(path) / META_FILE).exists() and val_data is None:
        if data_sha256(tokens_sha256(ds.train, ds.val), mask_sha256(*masks) if masks else None) != ds.sha256:
            what = "token and mask files" if masks else "token files"
            raise CrystalError(f"{path}: the {what} are not the ones meta.json describes (the sha256 of "
                               f"their {'tokens or masks' if masks else 'tokens'} differs); prepare the data set again")
        checked += ", the tokens' sha256 is meta.json's" + (" and the masks'" if masks else "")
    return {"data": ds.name, "vocab_size": ds.vocab_size, "train_tokens": len(ds.train),
            "val_tokens": len(ds.val), "parts": shards, "checked": checked}


MASK_FILES = ("train.mask", "val.mask")  # beside train.bin and val.bin (instruction data)
PREPARED_FILES = {"train.bin", "val.bin", *MASK_FILES, TOKENIZER_FILE, META_FILE}
SHARD_NAME = re.compile(r"(train|val)_[0-9]{6}\.(bin|mask)")  # prepare --shard-tokens (masks: instruction data)


def _check_prepare_out(out: Path) -> None:
    """--out is new, empty, or an earlier prepared data set (which it replaces): never a run's or
    anyone else's directory, whose files it would overwrite."""
    if out.exists() and not out.is_dir():
        raise CrystalError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES and not SHARD_NAME.fullmatch(p.name)
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # a killed write's
        if foreign or (any(out.iterdir()) and not (out / META_FILE).exists()):
            raise CrystalError(f"--out {out} holds files that are not a prepared data set "
                               f"({(foreign or sorted(p.name for p in out.iterdir()))[0]}, ...); "
                               "choose a new or empty directory")


DEFAULT_SHARD_TOKENS = 100_000_000  # a split of more tokens than this is written in shards of it
DEFAULT_BPE_TRAIN_BYTES = 1 << 28  # the text a bpe tokenizer trains on at most (a seeded sample beyond)
BPE_SAMPLE_SEED = 0
POOL_MIN_BYTES = 4 << 20  # smaller inputs are encoded in this process (starting workers costs more)
DECODE_TOKENS = 1 << 20  # val_bytes: the val ids decoded at most this many at a time


def prepare(inputs: list[str], out: str, tokenizer: str = "bytes", vocab_size: int = 1024,
            val_fraction: float = 0.1, shard_tokens: int | None = None, *, text_field: str = "text",
            workers: int | None = None, bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES,
            progress=None) -> dict:
    """Tokenize inputs (text files, .jsonl, .parquet; directories and globs of them: crystal.corpus)
    into a prepared directory; returns its meta.json contents.
    tokenizer: "bytes", "bpe" (trained here, vocab_size tokens, on at most bpe_train_bytes of the
    inputs: a seeded sample of pieces beyond), or the path of a tokenizer.json or of a directory
    holding one (its own vocabulary; written to `out` verbatim).
    shard_tokens: each split in shards train_000000.bin, ... of N tokens (the last fewer); None:
    train.bin and val.bin, unless a split has more than DEFAULT_SHARD_TOKENS (then shards of that).
    workers: processes that encode (None: the usable cores); the output is the same for any.
    progress: a stream for the progress line (None: silent).
    The inputs are read as streams and the ids written to scratch files as they come (memory is
    bounded for any corpus); the last val_fraction of the tokens is then the val split. All is
    written into a sibling directory that replaces `out` whole (see `_replace_dir`): an
    interrupted prepare leaves `out` as it was, and the next one starts over."""
    import crystal.corpus as corpus
    from crystal.spheres import usable_cores

    if not inputs:
        raise CrystalError("give at least one input file")
    if shard_tokens is not None and not (isinstance(shard_tokens, int) and shard_tokens >= 1):
        raise CrystalError(f"--shard-tokens must be a positive number of tokens, got {shard_tokens!r}")
    workers = usable_cores() if workers is None else workers
    if not (isinstance(workers, int) and 1 <= workers <= 1024):
        raise CrystalError(f"--workers must be in [1, 1024], got {workers!r}")
    if not (isinstance(bpe_train_bytes, int) and bpe_train_bytes >= 1):
        raise CrystalError(f"--bpe-train-bytes must be a positive number of bytes, got {bpe_train_bytes!r}")
    if not (isinstance(text_field, str) and text_field):
        raise CrystalError("--text-field must name a field")
    if not (0 <= val_fraction < 1):
        raise CrystalError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    _check_prepare_out(Path(out))
    given = None if tokenizer in ("bytes", "bpe") else BPETokenizer.from_file(tokenizer)
    if given is not None and given.vocab_size > MAX_VOCAB:
        raise CrystalError(f"{tokenizer}: {given.vocab_size} tokens, above crystal's limit of {MAX_VOCAB}")
    if tokenizer == "bpe" and not (256 < vocab_size <= MAX_VOCAB):
        raise CrystalError(f"--vocab-size for bpe must be in (256, {MAX_VOCAB}], got {vocab_size}")
    srcs = corpus.sources(inputs, META_FILE)
    total = sum(s.size for s in srcs)
    show = corpus.Progress(total, progress)
    sample = None
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif given is not None:
        tok = given
    else:
        tok, sample = _train_bpe(srcs, vocab_size, text_field, bpe_train_bytes, show)
    eot = tok.tok.token_to_id(EOT) if isinstance(tok, BPETokenizer) else None
    tok_json = tok.to_json()
    meta = {}

    def write(d: Path) -> None:
        scratch = np.uint8 if tok.vocab_size <= 256 else token_dtype(tok.vocab_size)  # bytes: 1 byte an id
        sink = corpus.TokenSink(d, scratch, tok.vocab_size)
        atomic_write_text(d / TOKENIZER_FILE, tok_json)  # first: worker processes are sent its path
        try:
            show.start("tokenizing")
            if isinstance(tok, ByteTokenizer):
                chunks = corpus.byte_ids(srcs, text_field, show)
            else:
                items = corpus.pieces(srcs, Cutter(tok.tok), text_field, eot is not None, show)
                chunks = corpus.encoded(corpus.batches(items, BATCH_CHARS), tok.tok, d / TOKENIZER_FILE, eot, workers,
                                        pool=workers > 1 and total >= POOL_MIN_BYTES)
            for ids in chunks:
                sink.write(ids)
                show.wrote(ids.size)
            sink.close()
            show.done()
            n = sink.count
            if n == 0:
                raise CrystalError("the inputs hold no text to tokenize")
            n_val = int(round(n * val_fraction))
            meta.update({"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "train_tokens": n - n_val,
                         "val_tokens": n_val, "val_bytes": 0, "sources": [str(p) for p in inputs],
                         "val_fraction": val_fraction, "tokens_sha256": sink.sha.hexdigest(),
                         "tokenizer_identity": tokenizer_identity(tok)})
            if given is not None:
                meta["tokenizer_from"] = str(tokenizer)
            if sample is not None:
                meta["bpe_sample"] = sample
            meta["end_of_text"] = eot
            meta["val_bytes"] = decoded_bytes(tok, sink.read(n - n_val, n, DECODE_TOKENS))  # read, not mapped
            for name, lo, hi in (("train", 0, n - n_val), ("val", n - n_val, n)):
                meta[f"{name}_shards"] = _write_split(d, sink, name, lo, hi, shard_tokens, tok.vocab_size)
        finally:
            sink.remove()
        atomic_write_json(d / META_FILE, meta)

    _replace_dir(Path(out), write)
    return meta


def _train_bpe(srcs, vocab_size: int, field: str, budget: int, show) -> tuple["BPETokenizer", dict | None]:
    """A BPE trained on the inputs, or, where they hold more than `budget` bytes, on a sample:
    each piece kept with probability budget / size, drawn in order from a generator seeded
    with BPE_SAMPLE_SEED (so a prepare trains the same tokenizer each time)."""
    import crystal.corpus as corpus

    total = sum(s.size for s in srcs)
    keep = min(1.0, budget / total)
    rng = np.random.default_rng(BPE_SAMPLE_SEED)
    kept = [0]

    def sampled(cutter):
        for piece in corpus.pieces(srcs, cutter, field, False, show):
            if keep >= 1.0 or rng.random() < keep:
                kept[0] += len(piece.encode("utf-8"))
                yield piece

    show.start("training bpe" if keep >= 1.0 else "training bpe (sample)")
    tok = BPETokenizer.train_on(sampled, vocab_size)
    show.done()
    if keep >= 1.0:
        return tok, None
    if kept[0] == 0:
        raise CrystalError(f"the seeded sample of {budget:,} of the {total:,} input bytes that bpe trains on took "
                           "no text; give a larger --bpe-train-bytes")
    return tok, {"bytes": kept[0], "of_bytes": total, "seed": BPE_SAMPLE_SEED}


def _write_split(d: Path, sink, name: str, lo: int, hi: int, shard_tokens: int | None, vocab: int) -> list[dict]:
    """The ids [lo, hi) of the stream as the split's token files: `name`.bin, or shards
    name_000000.bin, ... (at least one, empty where the split is); each written whole or not at
    all, then its scratch ids freed. Returns meta.json's list of them."""
    per = shard_tokens or DEFAULT_SHARD_TOKENS
    named = shard_tokens is not None or hi - lo > per
    dtype = token_dtype(vocab)
    listed = []
    for i, a in enumerate(range(lo, max(hi, lo + 1), per)):
        b = min(a + per, hi)
        file = f"{name}_{i:06d}.bin" if named else f"{name}.bin"
        header = TOKEN_HEADER.pack(TOKEN_MAGIC, TOKEN_VERSION, dtype.itemsize, b - a, vocab)
        atomic_write_chunks(d / file, itertools.chain([header], (x.astype(dtype, copy=False) for x in sink.read(a, b))))
        sink.drop_below(b)
        listed.append({"file": file, "tokens": b - a, "sample_sha256": sample_sha256(open_token_file(d / file))})
    return listed


def decoded_bytes(tok, chunks: Iterable[np.ndarray]) -> int:
    """UTF-8 bytes of the text that the ids, given as `chunks` of any sizes, decode to (val_bytes:
    bits per byte), decoded about DECODE_TOKENS at a time: a longer run is cut before the first
    token from DECODE_TOKENS on whose text starts with an ASCII character, where no character
    spans the cut (exact for byte-level decoders), or at 2 x DECODE_TOKENS. Holds at most
    2 x DECODE_TOKENS ids and a chunk."""
    chunks = iter(chunks)
    total, held, end = 0, np.empty(0, np.uint32), False
    while True:
        while not end and len(held) < 2 * DECODE_TOKENS:
            chunk = next(chunks, None)
            end = chunk is None
            held = held if end else np.concatenate([held, chunk])
        n = len(held)
        if n == 0:
            return total
        hi = min(n, DECODE_TOKENS)
        while hi < n and hi < 2 * DECODE_TOKENS and not _ascii_start(tok, int(held[hi])):
            hi += 1
        total += len(tok.decode(held[:hi]).encode("utf-8"))
        held = held[hi:]


def _ascii_start(tok, token: int) -> bool:
    text = tok.decode([token])
    return bool(text) and ord(text[0]) < 0x80


def _replace_dir(out: Path, write) -> None:
    """Replace the directory `out` (absent, empty or an earlier data set) as a whole: `write`
    fills a new sibling directory, which is renamed onto `out` only when complete. A reader of
    `out` sees the old data set or the new one, never a mix; after a failure (a full disk) `out`
    is as it was and the sibling is gone. A sibling left by a killed process (SIGKILL, a power
    cut: named by its host and process id) is removed by the next prepare into `out`. Replacing a non-empty `out` takes two renames (old
    aside, new in); a crash between them leaves `out` absent and the old data set beside it as
    .NAME.*.old, never a mix."""
    if out.is_symlink():
        out = out.resolve()  # the data set the link names is replaced, the link kept
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_OWNER}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a data set is an ordinary directory
        write(tmp)
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # onto the empty directory mkdtemp made
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            tmp = None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # rename(2) replaces an empty directory
            tmp = None
        fsync_dir(out.parent)
    except OSError as e:
        raise CrystalError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


_OWNER = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _remove_orphans(out: Path) -> None:
    """Delete the siblings `_replace_dir` left for `out` in a process of this host that is gone."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.{glob.escape(_OWNER)}.*.tmp"):
        pid = p.name[len(out.name) + len(_OWNER) + 3:].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # alive (another user's)


# --- batches ---------------------------------------------------------------------------------

IGNORE = -1  # a target the loss skips (PyTorch's ignore_index; the ops skip every target < 0)

@dataclass(frozen=True)
class Position:
    """Where the iterator stands: the next batch is batch `cursor` of epoch `epoch`."""

    epoch: int = 0
    cursor: int = 0


class BatchIterator:
    """Shuffled [B, T] (inputs, targets) batches of int32 token ids from one token stream (an
    array, or a TokenStream of memory-mapped shards: only the windows a batch takes are read).

    `order`: how an epoch's windows are shuffled (crystal.shards.WindowOrder): DATA_ORDER, or
    LEGACY_ORDER for a run that was started with it. Each batch's ids are checked against
    `vocab_size` (ids are checked whole at prepare time and by `crystal data verify`, not here).
    `mask` (instruction data): uint8 beside the tokens (an array or a stream of the same length),
    0 where a token is no target (a prompt's); the batch's mask rows are taken by the same
    windows, and a masked target is served as IGNORE (-1), which the cross-entropy ops skip. The
    windows, their order and the inputs are the same with or without it."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int,
                 vocab_size: int | None = None, what: str = "data", order: int = DATA_ORDER, mask=None):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([np.asarray(tokens)], [what])
        self.mask = mask if mask is None or isinstance(mask, TokenStream) else TokenStream([np.asarray(mask)],
                                                                                          [f"{what}'s mask"])
        if self.mask is not None and len(self.mask) != len(self.tokens):
            raise ValueError(f"a mask of {len(self.mask)} bytes for {len(self.tokens)} tokens")
        self.B, self.T, self.seed, self.order = batch_size, seq_len, seed, order
        self.vocab_size, self.what = vocab_size, what
        n = len(self.tokens)
        # Epoch e cuts the stream into windows at its own seeded phase in [0, T): window k starts
        # at phase + k*T. Successive epochs then see differently aligned windows, not the same
        # sequences again (which a model soon memorizes). Shifting costs the last window; a
        # stream with no window to spare keeps phase 0.
        whole = max(0, (n - 1) // seq_len)
        self.shifted = whole - 1 >= batch_size
        self.n_windows = whole - 1 if self.shifted else whole
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            need = batch_size * seq_len + 1
            raise CrystalError(f"{what} has {n} tokens; one batch of {batch_size} x "
                               f"{seq_len} tokens needs at least {need} (use less --batch-size or --seq-len)")
        self.position = Position()
        self._order: WindowOrder | None = None

    def window_order(self, epoch: int) -> WindowOrder:
        if self._order is None or self._order_epoch != epoch:
            self._order = WindowOrder(self.n_windows, self.T, self.shifted, self.seed, epoch, self.order)
            self._order_epoch = epoch
        return self._order

    def batch_starts(self, position: Position) -> np.ndarray:
        """The stream offsets of the B windows (T + 1 ids each) of the batch at `position`. A
        parallel stream (per-token masks) gives the batch's rows by `windows(starts, T + 1)` too."""
        order = self.window_order(position.epoch)
        positions = np.arange(position.cursor * self.B, (position.cursor + 1) * self.B, dtype=np.int64)
        return order.phase + order.at(positions) * self.T

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.batch_starts(self.position)
        rows = self.tokens.windows(starts, self.T + 1)
        if self.vocab_size is not None and int(rows.max()) >= self.vocab_size:
            self._refuse(rows, starts)
        epoch, cursor = self.position.epoch, self.position.cursor + 1
        if cursor == self.batches_per_epoch:
            epoch, cursor = epoch + 1, 0
        self.position = Position(epoch, cursor)
        targets = rows[:, 1:]
        if self.mask is not None:  # a prompt token is no target
            keep = self.mask.windows(starts, self.T + 1, np.uint8)[:, 1:]
            if int(keep.max()) > 1:
                r, c = np.unravel_index(int(np.argmax(keep > 1)), keep.shape)
                name, at = self.mask.where(int(starts[r]) + 1 + int(c))
                raise CrystalError(f"{self.what}: mask byte {int(keep[r, c])} at token {at:,} of {name} is not 0 or 1 "
                                   "(crystal data verify checks every byte)")
            targets = np.where(keep != 0, targets, IGNORE)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(targets, dtype=np.int32)

    def _refuse(self, rows: np.ndarray, starts: np.ndarray) -> None:
        r, c = np.unravel_index(int(np.argmax(rows >= self.vocab_size)), rows.shape)
        name, at = self.tokens.where(int(starts[r]) + int(c))
        raise CrystalError(f"{self.what}: token id {int(rows[r, c])} at token {at:,} of {name} is outside the "
                           f"vocabulary of {self.vocab_size} (crystal data verify checks every id)")

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


def eval_batches(val, batch_size: int, seq_len: int, seed: int, count: int, order: int = DATA_ORDER,
                 vocab_size: int | None = None, mask=None) -> list:
    """The fixed validation set: the first `count` batches (at most one epoch) of the val split
    (mask: its loss mask, as BatchIterator's)."""
    it = BatchIterator(val, batch_size, seq_len, seed, vocab_size, what="the validation split", order=order,
                       mask=mask)
    return [it.next_batch() for _ in range(min(count, it.batches_per_epoch))]


def run_tokenizer(run: Path):
    """The tokenizer a run was trained with: its tokenizer.json (a byte tokenizer is one too,
    a BPE without merges), or bytes when there is none."""
    has_json = (Path(run) / TOKENIZER_FILE).exists()
    return load_tokenizer(run, "bpe" if has_json else "bytes")
