"""Token shards on disk, read through memory maps: crystal's token files and llm.c's, one stream
of ids over many shards, and the seeded window order of an epoch without an array of every window.

Token files (`open_token_file` reads and checks the header and the exact size, never the ids):
  crystal: a 32-byte little-endian header, then the ids:
      magic b"CRYSTOK1" | version u32 = 1 | itemsize u32 (2: uint16, 4: uint32) |
      count u64 | vocab_size u32 | 4 zero bytes
  llm.c (dev/data/data_common.py write_datafile, llmc/dataloader.h): 256 int32 little-endian,
      [0] magic, [1] version, [2] token count, the rest zero; then the ids. Two kinds:
      magic 20240520 version 1: uint16 ids (GPT-2's tokenizer, vocabulary 50,257);
      magic 20240801 version 7: uint32 ids (LLaMA 3's, vocabulary 128,256).
  llm.c's header holds no vocabulary: it is the caller's (--vocab-size, the tokenizer given, or
  the one its magic names).

Every id below the vocabulary is checked where the tokens are made (`crystal prepare`) and by
`crystal data verify` (`scan_ids`), not when a run starts: training reads only the windows its
batches touch, and checks those (BatchIterator).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystal.atomic import check_regular
from crystal.errors import CrystalError

TOKEN_MAGIC = b"CRYSTOK1"
TOKEN_VERSION = 1
TOKEN_HEADER = struct.Struct("<8sIIQI4x")  # 32 bytes
LLMC_HEADER_BYTES = 256 * 4
# llm.c's magic -> (version, id dtype, the vocabulary of the tokenizer it stands for)
LLMC_FORMATS = {20240520: (1, np.dtype("<u2"), 50257), 20240801: (7, np.dtype("<u4"), 128256)}
SAMPLE_BLOCKS, SAMPLE_BYTES = 8, 4096  # a shard's fingerprint: its header, size and 8 blocks of 4 KiB
SCAN_TOKENS = 1 << 22  # ids read at once by scan_ids and stream_sha256 (bounded memory)


def token_dtype(vocab_size: int):
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


@dataclass(frozen=True)
class TokenFile:
    """One token shard, its header checked: `count` ids of `dtype` from byte `offset` on."""

    path: Path
    kind: str  # "crystal" or "llm.c"
    offset: int
    dtype: np.dtype
    count: int
    vocab_size: int | None  # None: llm.c's header has none
    header: bytes  # the raw header (the fingerprint hashes it)

    @property
    def llmc_vocab(self) -> int | None:
        """The vocabulary of the tokenizer an llm.c header's magic names."""
        return LLMC_FORMATS[struct.unpack_from("<i", self.header)[0]][2] if self.kind == "llm.c" else None


def is_token_file(path: Path) -> bool:
    """Whether a file starts like a token file of either kind (the rest is `open_token_file`'s)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head == TOKEN_MAGIC or (len(head) >= 4 and struct.unpack_from("<i", head)[0] in LLMC_FORMATS)


def open_token_file(path: str | Path) -> TokenFile:
    """A token file's header and size, checked; the ids are not read."""
    path = Path(path)
    check_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
    except FileNotFoundError:
        raise CrystalError(f"token file not found: {path}") from None
    except OSError as e:
        raise CrystalError(f"cannot read token file {path}: {e.strerror or e}") from None
    if len(head) >= 4 and struct.unpack_from("<i", head)[0] in LLMC_FORMATS:
        return _llmc_file(path, head, size)
    if len(head) < TOKEN_HEADER.size:
        raise CrystalError(f"{path}: truncated token file header ({size} bytes)")
    magic, version, itemsize, count, vocab = TOKEN_HEADER.unpack_from(head)
    if magic != TOKEN_MAGIC:
        raise CrystalError(f"{path}: not a crystal token file nor an llm.c token shard (bad magic)")
    if version != TOKEN_VERSION:
        raise CrystalError(f"{path}: token file version {version} is not supported")
    if itemsize not in (2, 4) or vocab < 1 or token_dtype(vocab).itemsize != itemsize:
        raise CrystalError(f"{path}: corrupt token file header (itemsize {itemsize}, vocab {vocab})")
    if size != TOKEN_HEADER.size + count * itemsize:
        raise CrystalError(f"{path}: truncated or padded token file (header says {count} tokens, "
                           f"file has {size - TOKEN_HEADER.size} bytes of ids)")
    return TokenFile(path, "crystal", TOKEN_HEADER.size, token_dtype(vocab), count, vocab,
                     bytes(head[:TOKEN_HEADER.size]))


def _llmc_file(path: Path, head: bytes, size: int) -> TokenFile:
    if len(head) < LLMC_HEADER_BYTES:
        raise CrystalError(f"{path}: truncated llm.c token shard header ({size} bytes, the header is "
                           f"{LLMC_HEADER_BYTES})")
    magic, version, count = struct.unpack_from("<3i", head)
    want, dtype, _ = LLMC_FORMATS[magic]
    if version != want:
        raise CrystalError(f"{path}: llm.c token shard of magic {magic} with version {version} "
                           f"(llm.c writes version {want})")
    if count <= 0:
        raise CrystalError(f"{path}: llm.c token shard header says {count} tokens")
    if size != LLMC_HEADER_BYTES + count * dtype.itemsize:
        raise CrystalError(f"{path}: truncated or padded llm.c token shard (header says {count} tokens of "
                           f"{dtype.itemsize} bytes, file has {size - LLMC_HEADER_BYTES} bytes of ids)")
    return TokenFile(path, "llm.c", LLMC_HEADER_BYTES, dtype, count, None, bytes(head))


def map_tokens(tf: TokenFile) -> np.ndarray:
    """The file's ids as a read-only array over a memory map: pages are read when a window
    touches them. Windows are taken in random order, so the kernel is told not to read ahead
    (MADV_RANDOM): the resident data is the pages the batches touch, not their neighbourhoods."""
    if tf.count == 0:
        return np.empty(0, dtype=tf.dtype)
    try:
        with open(tf.path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CrystalError(f"cannot map token file {tf.path}: {getattr(e, 'strerror', None) or e}") from None
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        m.madvise(mmap.MADV_RANDOM)
    if len(m) != tf.offset + tf.count * tf.dtype.itemsize:
        raise CrystalError(f"{tf.path}: changed size since its header was read")
    return np.frombuffer(m, dtype=tf.dtype, count=tf.count, offset=tf.offset)


def sample_sha256(tf: TokenFile) -> str:
    """A shard's fingerprint without reading it all: sha256 of its header, its size and
    SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread evenly over its ids (the first and the last
    included; the whole file when it is no larger than those blocks together)."""
    h = hashlib.sha256(tf.header)
    data = tf.count * tf.dtype.itemsize
    h.update(struct.pack("<Q", data))
    if data <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        spans = [(0, data)]
    else:
        step = (data - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
        spans = [(int(i * step), SAMPLE_BYTES) for i in range(SAMPLE_BLOCKS)]
    try:
        with open(tf.path, "rb") as f:
            for at, n in spans:
                f.seek(tf.offset + at)
                block = f.read(n)
                if len(block) != n:
                    raise CrystalError(f"{tf.path}: shorter than its header says (changed while read?)")
                h.update(block)
    except OSError as e:
        raise CrystalError(f"cannot read token file {tf.path}: {e.strerror or e}") from None
    return h.hexdigest()


def scan_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    """Every id of `ids` (a memory map: read SCAN_TOKENS at a time) below vocab_size, or
    CrystalError naming the first one that is not."""
    for lo in range(0, len(ids), SCAN_TOKENS):
        chunk = np.asarray(ids[lo:lo + SCAN_TOKENS])
        if int(chunk.max()) >= vocab_size:
            at = lo + int(np.argmax(chunk >= vocab_size))
            raise CrystalError(f"{name}: token id {int(ids[at])} at token {at:,} is outside the "
                               f"vocabulary of {vocab_size}")


def tokens_sha256(*arrays) -> str:
    """sha256 of token ids as little-endian uint32, whatever width they are stored at, read
    SCAN_TOKENS at a time (so a memory map is never read whole into memory)."""
    h = hashlib.sha256()
    for a in arrays:
        for part in (a.parts if isinstance(a, TokenStream) else [a]):
            for lo in range(0, len(part), SCAN_TOKENS):
                h.update(np.asarray(part[lo:lo + SCAN_TOKENS], dtype="<u4").tobytes())
    return h.hexdigest()


# --- one stream over many shards -------------------------------------------------------------------

class TokenStream:
    """Token arrays (memory maps or in-memory ids) read as one stream: shard after shard, as if
    concatenated. Windows may cross from one shard into the next."""

    def __init__(self, parts: list, names: list[str] | None = None):
        self.parts = [p for p in parts]
        self.names = names or [f"part {i}" for i in range(len(parts))]
        self.bounds = np.zeros(len(self.parts) + 1, dtype=np.int64)  # part i holds [bounds[i], bounds[i+1])
        np.cumsum([len(p) for p in self.parts], out=self.bounds[1:])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __array__(self, dtype=None, copy=None):
        """Every id in memory (small streams: tests and tools)."""
        a = np.concatenate(self.parts) if self.parts else np.empty(0, np.uint16)
        return a if dtype is None else a.astype(dtype)

    def slice(self, lo: int, hi: int) -> "TokenStream":
        """The ids [lo, hi) as a stream of views (nothing is read)."""
        parts, names = [], []
        for p, name, a, b in zip(self.parts, self.names, self.bounds[:-1], self.bounds[1:]):
            s, e = max(lo, int(a)), min(hi, int(b))
            if s < e:
                parts.append(p[s - a:e - a])
                names.append(name)
        return TokenStream(parts, names)

    def where(self, index: int) -> tuple[str, int]:
        """(shard name, offset in it) of the stream's id `index`."""
        i = int(np.searchsorted(self.bounds, index, side="right")) - 1
        return self.names[i], index - int(self.bounds[i])

    def windows(self, starts: np.ndarray, length: int, dtype=np.int32) -> np.ndarray:
        """[len(starts), length] ids: row r is ids [starts[r], starts[r] + length). A parallel
        stream of the same lengths (per-token masks) gives the same rows' values by the same call."""
        out = np.empty((len(starts), length), dtype=dtype)
        first = np.searchsorted(self.bounds, starts, side="right") - 1
        for r, (s, i) in enumerate(zip(starts.tolist(), first.tolist())):
            done = 0
            while done < length:  # usually one shard; a window crossing a boundary reads on in the next
                a = int(self.bounds[i])
                take = min(length - done, int(self.bounds[i + 1]) - (s + done))
                out[r, done:done + take] = self.parts[i][s + done - a:s + done - a + take]
                done += take
                i += 1
        return out


# --- the order of an epoch's windows ---------------------------------------------------------------
#
# An epoch visits its n windows in a seeded order. Order 2 (every run since sharded data sets) is
# a keyed Feistel permutation of [0, 4^h) (4^h the least power of 4 >= n, so at most 4n) walked
# back into [0, n): position p maps to the first of perm(p), perm(perm(p)), ... below n, which is
# a bijection of [0, n) (cycle walking). Any position is computed alone, in O(1) memory, so a batch
# costs B evaluations whatever n is, and a resumed run computes the same positions. Order 1 (runs
# started before) is numpy's permutation of every window, an array of 8n bytes; it is kept only
# so that such a run resumes with the batches it would have seen (train.json's data_order).

DATA_ORDER = 2  # new runs
LEGACY_ORDER = 1  # runs whose train.json records no data_order
FEISTEL_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class WindowOrder:
    """Epoch `epoch`'s order of `n` windows: `phase` (the epoch's cut, in [0, seq_len) when
    `shifted`) and `at(positions)`, the window indices at those positions of the order."""

    def __init__(self, n: int, seq_len: int, shifted: bool, seed: int, epoch: int, order: int = DATA_ORDER):
        if order not in (DATA_ORDER, LEGACY_ORDER):
            raise CrystalError(f"data order {order!r} is not one crystal knows ({LEGACY_ORDER} or {DATA_ORDER})")
        self.n, self.order = n, order
        rng = np.random.default_rng([seed, epoch])  # the phase is drawn first in either order
        self.phase = int(rng.integers(seq_len)) if shifted else 0
        if order == LEGACY_ORDER:
            self._perm = rng.permutation(n)
            return
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # 4^half >= n
        self.keys = rng.integers(0, 1 << 63, size=FEISTEL_ROUNDS, dtype=np.int64).astype(np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << h) | right

    def at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if self.order == LEGACY_ORDER:
            return self._perm[positions]
        y = self._feistel(positions.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: on average fewer than 4 rounds of the permutation
            y[out] = self._feistel(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)
