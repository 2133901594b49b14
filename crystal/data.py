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

A prepared directory holds train.bin, val.bin, tokenizer.json and meta.json, written as a whole
(a sibling directory renamed into place); meta.json's token counts and hash tie the token files
to it, and its tokenizer identity ties them to the tokenizer (`tokenizer_identity`). A plain text
file (or the embedded corpus) is prepared on the fly with the byte tokenizer; its last
`val_fraction` of tokens is the validation split, as nanoGPT does.

Instruction data (crystal.instruct, `prepare --format alpaca|chat`) adds train.mask and val.mask:
one byte per token, 1 where the token is a response token (a target of the loss), 0 on prompt
tokens; meta.json's `masks` records their sha256. The iterator serves a masked target as IGNORE
(-1), which the cross-entropy ops skip.

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
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_regular, fsync_dir
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
        # A token stream is the whole text's ids: a tokenizer.json's truncation or padding (made for
        # model inputs of one length) would cut or pad every piece; to_json still gives them back.
        tok.no_truncation()
        tok.no_padding()
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, names: list[str] | None = None) -> "BPETokenizer":
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
        cutter = Cutter(stand_in)
        tok.train_from_iterator((p for t, n in zip(texts, names or ["input"] * len(texts))
                                 for p in cutter.pieces(t, n)), trainer=trainer)
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

    def encode_many(self, texts: list[str], names: list[str]) -> np.ndarray:
        """Each text's `encode` ids, one text after another: the texts are encoded in pieces cut
        where `Cutter` proves a token boundary (so the ids are exactly the whole text's), a batch
        of pieces of at most BATCH_CHARS characters (or one piece of at most MAX_PIECE_CHARS) at a
        time, so memory is bounded whatever the line lengths."""
        cutter, out, batch = Cutter(self.tok), [], []

        def flush():
            for e in self.tok.encode_batch(batch, add_special_tokens=False):  # in parallel
                out.append(np.asarray(e.ids, dtype=np.uint32))
            batch.clear()

        for text, name in zip(texts, names):
            for piece in cutter.pieces(text, name):
                if batch and sum(map(len, batch)) + len(piece) > BATCH_CHARS:
                    flush()
                batch.append(piece)
        flush()
        ids = np.concatenate(out) if out else np.empty(0, np.uint32)
        if ids.size and int(ids.max()) >= self.vocab_size:  # before narrowing to the file's width
            raise CrystalError(f"the tokenizer gave token id {int(ids.max())}, outside its vocabulary of "
                               f"{self.vocab_size}")
        return ids.astype(token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

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
        start = 0
        while len(text) - start > PIECE_CHARS:
            cut = self._cut(text, start + PIECE_CHARS, start + MAX_PIECE_CHARS) if self.local else None
            if cut is None:
                if len(text) - start <= MAX_PIECE_CHARS:
                    break
                raise CrystalError(self._refusal(text, start, name))
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _refusal(self, text: str, start: int, name: str) -> str:
        limit = f"crystal encodes at most {MAX_PIECE_CHARS:,} characters at once; split the input into smaller files"
        if not self.local:
            kinds = "+".join(str(s.get("type")) for s in _normalizer_steps(self.normalizer))
            return (f"{name}: {len(text):,} characters, and the tokenizer's normalizer ({kinds}) may join "
                    f"characters across any cut, so the text can only be encoded whole; {limit}")
        return (f"{name}: no token boundary that the tokenizer's pre-tokenizer proves between characters "
                f"{start + PIECE_CHARS:,} and {min(len(text), start + MAX_PIECE_CHARS):,}; {limit}")

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
    tokenizer_identity: str = ""  # as meta.json records it; "" where it does not (then: the tokenizer's own)
    # instruction data (crystal.instruct): 1 where a token is a response token, the loss's targets;
    # None: every token is a target
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None

    @property
    def masked(self) -> bool:
        return self.train_mask is not None

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per target token of the val split (masked: per response token)."""
        n = int(np.count_nonzero(self.val_mask)) if self.val_mask is not None else len(self.val)
        return self.val_bytes / n if n else 1.0


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


def mask_sha256(mask: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(mask, dtype=np.uint8).tobytes()).hexdigest()


def data_sha256(tokens_sha: str, mask_shas: dict | None) -> str:
    """What identifies a data set (train.json records it): its tokens' hash, and with masks a
    hash of that and the masks' (so a changed mask is changed data)."""
    if not mask_shas:
        return tokens_sha
    text = tokens_sha + "".join(mask_shas[name] for name in MASK_FILES)
    return hashlib.sha256(text.encode()).hexdigest()


def read_mask(path: Path, count: int, sha: str) -> np.ndarray:
    """A mask file: `count` bytes, each 0 or 1, whose sha256 meta.json records."""
    check_regular(path)
    try:
        mask = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise CrystalError(f"mask file not found: {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read mask file {path}: {e.strerror or e}") from None
    if mask.size != count:
        raise CrystalError(f"{path}: {mask.size:,} mask bytes for {count:,} tokens; prepare the data set again")
    if mask.size and int(mask.max()) > 1:
        raise CrystalError(f"{path}: a mask byte is {int(mask.max())}, not 0 or 1")
    if mask_sha256(mask) != sha:
        raise CrystalError(f"{path}: not the mask meta.json describes (its sha256 differs); prepare the "
                           "data set again")
    return mask


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_prepared(directory: Path) -> DataSet:
    """A directory made by `prepare`, after checking that its files belong together: the token
    files hold the counts (and, where recorded, the token hash) meta.json gives, in its vocabulary."""
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
        masks = meta.get("masks")  # instruction data: {file name: sha256}
        if masks is not None and not (isinstance(masks, dict) and set(masks) == set(MASK_FILES)
                                      and all(isinstance(v, str) for v in masks.values())):
            raise ValueError(f"masks must map {' and '.join(MASK_FILES)} to their sha256, got {masks!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CrystalError(f"{directory / META_FILE}: not a valid data set description ({e})") from None
    if kind not in ("bytes", "bpe", "hf"):
        raise CrystalError(f"{directory / META_FILE}: unknown tokenizer {kind!r}")
    train, v1 = read_tokens(directory / "train.bin")
    val, v2 = read_tokens(directory / "val.bin")
    if v1 != vocab or v2 != vocab:
        raise CrystalError(f"{directory}: token files disagree with meta.json on the vocabulary size")
    mixed = "; the files come from different runs of crystal prepare: prepare the data set again"
    for name, ids, count in (("train.bin", train, counts[0]), ("val.bin", val, counts[1])):
        if len(ids) != count:
            raise CrystalError(f"{directory}: {name} holds {len(ids):,} tokens, meta.json says {count:,}{mixed}")
    sha = tokens_sha256(train, val)
    if recorded["tokens_sha256"] and recorded["tokens_sha256"] != sha:
        raise CrystalError(f"{directory}: the token files are not the ones meta.json describes (their sha256 "
                           f"differs){mixed}")
    tok = load_tokenizer(directory, kind)
    if tok.vocab_size != vocab:
        raise CrystalError(f"{directory}: tokenizer.json has {tok.vocab_size} tokens, meta.json {vocab}")
    train_mask = val_mask = None
    if masks is not None:
        train_mask, val_mask = (read_mask(directory / name, len(ids), masks[name])
                                for name, ids in zip(MASK_FILES, (train, val)))
        if not train_mask.any():
            raise CrystalError(f"{directory}: the masks leave no response token to train on in the training split")
    return DataSet(train, val, tok, vocab, str(directory), val_bytes, data_sha256(sha, masks),
                   recorded["tokenizer_identity"], train_mask, val_mask)


MASK_FILES = ("train.mask", "val.mask")
PREPARED_FILES = {"train.bin", "val.bin", *MASK_FILES, TOKENIZER_FILE, META_FILE}


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
    or of a directory holding one (its own vocabulary; written to `out` verbatim).
    Everything is read and encoded before anything is written; the data set is then written
    into a sibling directory that replaces `out` whole (see `_replace_dir`)."""
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
        del raw
        tok = given or BPETokenizer.train(texts, vocab_size, inputs)
        ids = tok.encode_many(texts, inputs)
    train, val = split(ids, val_fraction)
    tok_json = tok.to_json()
    meta = {
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
        "train_tokens": int(train.size), "val_tokens": int(val.size),
        "val_bytes": len(tok.decode(val).encode("utf-8")) if val.size else 0,
        "sources": [str(p) for p in inputs], "val_fraction": val_fraction,
        "tokens_sha256": tokens_sha256(train, val), "tokenizer_identity": tokenizer_identity(tok),
    }
    if given is not None:
        meta["tokenizer_from"] = str(tokenizer)

    def write(d: Path) -> None:
        write_tokens(d / "train.bin", train, tok.vocab_size)
        write_tokens(d / "val.bin", val, tok.vocab_size)
        atomic_write_text(d / TOKENIZER_FILE, tok_json)
        atomic_write_json(d / META_FILE, meta)

    _replace_dir(Path(out), write)
    return meta


def _replace_dir(out: Path, write) -> None:
    """Replace the directory `out` (absent, empty or an earlier data set) as a whole: `write`
    fills a new sibling directory, which is renamed onto `out` only when complete. A reader of
    `out` sees the old data set or the new one, never a mix; after a failure (a full disk) `out`
    is as it was and the sibling is gone. Replacing a non-empty `out` takes two renames (old
    aside, new in); a crash between them leaves `out` absent and the old data set beside it as
    .NAME.*.old, never a mix."""
    if out.is_symlink():
        out = out.resolve()  # the data set the link names is replaced, the link kept
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
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


# --- batches ---------------------------------------------------------------------------------

IGNORE = -1  # a target the loss skips (PyTorch's ignore_index; the ops skip every target < 0)

@dataclass(frozen=True)
class Position:
    """Where the iterator stands: the next batch is batch `cursor` of epoch `epoch`."""

    epoch: int = 0
    cursor: int = 0


class BatchIterator:
    """Shuffled [B, T] (inputs, targets) batches of int32 token ids from one token stream.
    mask (instruction data): a uint8 array beside the tokens, 0 where a token is no target (a
    prompt's); its target is served as IGNORE (-1), which the cross-entropy ops skip. The windows
    are the same with or without it."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 vocab_size: int | None = None, what: str = "data", mask: np.ndarray | None = None):
        tokens = np.asarray(tokens)
        if mask is not None and np.shape(mask) != tokens.shape:
            raise ValueError(f"a mask of shape {np.shape(mask)} for {tokens.shape} tokens")
        self.mask = mask
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
        targets = rows[:, 1:]
        if self.mask is not None:  # a prompt token is no target
            targets = np.where(self.mask[starts[:, None] + self._offsets[1:]] != 0, targets, IGNORE)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(targets, dtype=np.int32)

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


def eval_batches(val: np.ndarray, batch_size: int, seq_len: int, seed: int, count: int,
                 mask: np.ndarray | None = None) -> list:
    """The fixed validation set: the first `count` batches (at most one epoch) of the val split."""
    it = BatchIterator(val, batch_size, seq_len, seed, what="the validation split", mask=mask)
    return [it.next_batch() for _ in range(min(count, it.batches_per_epoch))]


def run_tokenizer(run: Path):
    """The tokenizer a run was trained with: its tokenizer.json (a byte tokenizer is one too,
    a BPE without merges), or bytes when there is none."""
    has_json = (Path(run) / TOKENIZER_FILE).exists()
    return load_tokenizer(run, "bpe" if has_json else "bytes")
