"""Corpora read as streams for `crystal prepare`: the inputs (files, directories, globs; text,
.jsonl, .parquet), their documents, encoding in parallel worker processes in a fixed order, the
token stream written to scratch files as it comes, and the progress line.

Memory is bounded whatever the corpus: a text file is read READ_BYTES at a time (and cut into
pieces where the tokenizer proves a boundary: crystal.data.Cutter.stream), a .jsonl line or a
.parquet row is one document, at most 2 x workers batches of pieces (BATCH_CHARS characters
each) are in flight, and the ids go to disk as they are made.

Documents: a text file is one document, a .jsonl line (its `--text-field`) or a .parquet row one
each. Between two documents the tokenizer's <|endoftext|> goes, where it has one (the byte
tokenizer has none: documents follow one another as they are).

The ids do not depend on the worker count: the pieces are cut in this process, each is encoded by
itself (so a batch's boundaries change nothing), and the batches' ids are taken back in the
order they were sent.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from crystal.atomic import check_regular
from crystal.encode import encode_items, encode_task, init_worker, word_cache
from crystal.errors import CrystalError
from crystal.jsonio import parse_json

READ_BYTES = 1 << 20  # a text file is read this many bytes at a time
PARQUET_ROWS = 1024  # a .parquet file is read this many rows at a time
SCRATCH_TOKENS = 1 << 24  # ids per scratch file (a finished shard frees its scratch files)
GLOB_CHARS = "*?["
KINDS = {".jsonl": "jsonl", ".parquet": "parquet"}  # any other file is text


@dataclass(frozen=True)
class Source:
    """One input file: `kind` is text, jsonl or parquet; `size` its bytes."""

    path: Path
    kind: str
    size: int


def sources(inputs: list[str], meta_file: str) -> list[Source]:
    """The files `inputs` name, in order: a file; a directory (its files, recursively, in the
    order of their paths, hidden ones left out); a glob (its matches in the order of their names).
    Every file is checked here, before anything is read."""
    out = []
    for spec in inputs:
        path = Path(spec)
        if not path.exists() and any(c in spec for c in GLOB_CHARS):
            names = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not names:
                raise CrystalError(f"{spec}: the pattern matches no file")
            paths = [Path(n) for n in names]
        else:
            paths = [path]
        for p in paths:
            if p.is_dir():
                if (p / meta_file).exists():
                    raise CrystalError(f"{p} is a data set made by crystal prepare, not text to prepare")
                files = sorted(f for f in p.rglob("*") if f.is_file()
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
                if not files:
                    raise CrystalError(f"{p}: a directory without files")
                out.extend(_source(f) for f in files)
            else:
                out.append(_source(p))
    return out


def _source(path: Path) -> Source:
    if not path.exists():
        raise CrystalError(f"data file not found: {path}")
    check_regular(path)
    size = path.stat().st_size
    if size == 0:
        raise CrystalError(f"data file {path} is empty")
    kind = KINDS.get(path.suffix.lower(), "text")
    if kind == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise CrystalError(f"{path}: reading .parquet needs pyarrow, which is not installed (pip install pyarrow)")
    return Source(path, kind, size)


# --- progress ----------------------------------------------------------------------------------------

class Progress:
    """What `crystal prepare` has read and written, as one line on `stream`: redrawn in place
    every half second on a terminal, else a plain line every 30 seconds (logs). None: silent."""

    def __init__(self, total_bytes: int, stream=None):
        self.total, self.stream = total_bytes, stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else 30.0
        self.start("reading")

    def start(self, phase: str) -> None:
        self.phase, self.bytes, self.tokens = phase, 0, 0
        self.t0 = self.last = time.monotonic()

    def read(self, n: int) -> None:
        self.bytes += n
        self._maybe_show()

    def wrote(self, n: int) -> None:
        self.tokens += n
        self._maybe_show()

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        pct = f" ({100 * self.bytes / self.total:.0f}%)" if self.total else ""
        tokens = f" | {self.tokens:,} tokens ({self.tokens / dt:,.0f}/s)" if self.tokens else ""
        return (f"{self.phase}: {self.bytes / 1e6:,.1f} of {self.total / 1e6:,.1f} MB{pct} | "
                f"{self.bytes / 1e6 / dt:,.2f} MB/s{tokens}")

    def _maybe_show(self) -> None:
        now = time.monotonic()
        if self.stream is not None and now - self.last >= self.every:
            self.last = now
            self.stream.write(("\r" + self.line() + "\x1b[K") if self.tty else self.line() + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()


# --- documents -----------------------------------------------------------------------------------------

def _text_chunks(src: Source, progress: Progress) -> Iterator[str]:
    """A text file as UTF-8 text, READ_BYTES at a time."""
    dec = codecs.getincrementaldecoder("utf-8")()
    at = 0
    with open(src.path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            held = len(dec.getstate()[0])  # bytes of a character the last block ended inside
            try:
                text = dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise CrystalError(f"{src.path} is not UTF-8 text (byte {at - held + e.start}); "
                                   "use --tokenizer bytes") from None
            at += len(block)
            progress.read(len(block))
            if text:
                yield text
            if not block:
                return


def _byte_chunks(src: Source, progress: Progress) -> Iterator[bytes]:
    with open(src.path, "rb") as f:
        while block := f.read(READ_BYTES):
            progress.read(len(block))
            yield block


def _field(value, field: str, where: str) -> str:
    if not isinstance(value, dict) or field not in value:
        raise CrystalError(f"{where}: no {field!r} field (--text-field)")
    if not isinstance(value[field], str):
        raise CrystalError(f"{where}: the {field!r} field is not a string")
    return value[field]


def _jsonl_texts(src: Source, field: str, progress: Progress) -> Iterator[str]:
    """Each non-blank line's `field` (a line is read whole: it is one document)."""
    with open(src.path, "rb", buffering=READ_BYTES) as f:  # not 8 KiB reads
        for n, line in enumerate(f, 1):
            progress.read(len(line))
            if line.strip():
                where = f"{src.path} line {n}"
                yield _field(parse_json(line, where), field, where)


def _parquet_texts(src: Source, field: str, progress: Progress) -> Iterator[str]:
    """Each row's `field`, in row order, read PARQUET_ROWS rows at a time (pyarrow). The column
    must be of a string type; a null in it is refused with its row (counted from 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def why(e: Exception) -> str:
        return (str(e).splitlines() or [type(e).__name__])[0][:200]

    try:
        pf = pq.ParquetFile(src.path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise CrystalError(f"{src.path}: not a parquet file ({why(e)})") from None
    if field not in schema.names:
        raise CrystalError(f"{src.path}: no {field!r} column (--text-field; it has {', '.join(schema.names[:8])})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise CrystalError(f"{src.path}: the {field!r} column holds {kind}, not strings")
    rows, done = max(pf.metadata.num_rows, 1), 0
    batches = pf.iter_batches(batch_size=PARQUET_ROWS, columns=[field])
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            col = batch.column(0)
            if col.null_count:
                first = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
                raise CrystalError(f"{src.path} row {done + first} (counting from 0): the {field!r} field is null")
            texts = col.to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise CrystalError(f"{src.path}: a damaged parquet file ({why(e)})") from None
        yield from texts
        progress.read(src.size * (done + batch.num_rows) // rows - src.size * done // rows)
        done += batch.num_rows


def documents(src: Source, field: str, text: bool, progress: Progress) -> Iterator[Iterable]:
    """The documents of one input, each as an iterable of str (text) or of bytes (not text)."""
    if src.kind == "text":
        yield _text_chunks(src, progress) if text else _byte_chunks(src, progress)
        return
    for t in (_jsonl_texts if src.kind == "jsonl" else _parquet_texts)(src, field, progress):
        yield (t,) if text else (t.encode("utf-8"),)


def pieces(srcs: list[Source], cutter, field: str, separate: bool, progress: Progress) -> Iterator[str | None]:
    """Every document's text in pieces that `cutter` (crystal.data.Cutter) proves encode one
    after another to the document's ids; None between documents where `separate`."""
    first = True
    for src in srcs:
        for doc in documents(src, field, True, progress):
            if separate and not first:
                yield None
            first = False
            yield from cutter.stream(doc, str(src.path))


def byte_ids(srcs: list[Source], field: str, progress: Progress) -> Iterator[np.ndarray]:
    """The byte tokenizer's ids of every document, one after another, about READ_BYTES at a time
    (uint8: each id is a byte; the documents' bytes joined, viewed, never converted)."""
    parts, n = [], 0
    for src in srcs:
        for doc in documents(src, field, False, progress):
            for b in doc:
                parts.append(b)
                n += len(b)
                if n >= READ_BYTES:
                    yield np.frombuffer(b"".join(parts), dtype=np.uint8)
                    parts, n = [], 0
    if parts:
        yield np.frombuffer(b"".join(parts), dtype=np.uint8)


def batches(items: Iterable[str | None], limit: int) -> Iterator[list]:
    """`items` in lists of at most `limit` characters (or one longer piece); None counts one."""
    batch, chars = [], 0
    for item in items:
        n = 1 if item is None else len(item)
        if batch and chars + n > limit:
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += n
    if batch:
        yield batch


# --- encoding ------------------------------------------------------------------------------------------

def encoded(batches: Iterable[list], tok, tok_file: Path, eot: int | None, workers: int,
            pool: bool) -> Iterator[np.ndarray]:
    """Each batch's uint32 ids, in order. pool: by `workers` processes (spawned; at most two
    batches each in flight), one core each; else here (workers > 1: the library's threads)."""
    if not pool:
        words = word_cache(tok)
        for b in batches:
            yield np.frombuffer(encode_items(tok, b, eot, threads=workers > 1, words=words), dtype=np.uint32)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(str(tok_file),)) as ex:
        pending = deque()
        try:
            for b in batches:
                pending.append(ex.submit(encode_task, b, eot))
                if len(pending) >= 2 * workers:
                    yield np.frombuffer(pending.popleft().result(), dtype=np.uint32)
            while pending:
                yield np.frombuffer(pending.popleft().result(), dtype=np.uint32)
        except BrokenProcessPool:
            raise CrystalError("a tokenizer worker process died (out of memory? try fewer --workers)") from None
        finally:
            for f in pending:
                f.cancel()


# --- the token stream on disk ----------------------------------------------------------------------------

class TokenSink:
    """The token stream written as it comes into scratch files of SCRATCH_TOKENS ids (`dtype`)
    in `directory`, read back by ranges; also its count and tokens_sha256 (crystal.shards: the
    ids as little-endian uint32)."""

    def __init__(self, directory: Path, dtype: np.dtype, vocab_size: int):
        self.dir, self.dtype, self.vocab = directory, np.dtype(dtype), vocab_size
        self.count, self.sha = 0, hashlib.sha256()
        self.files: list[Path] = []
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        if ids.size and int(ids.max()) >= self.vocab:
            raise CrystalError(f"the tokenizer gave token id {int(ids.max())}, outside its vocabulary of {self.vocab}")
        self.sha.update(ids.astype("<u4"))  # hashlib and write take the arrays' buffers: no bytes copies
        data = ids.astype(self.dtype, copy=False)
        while data.size:
            room = SCRATCH_TOKENS - (self.count - SCRATCH_TOKENS * (len(self.files) - 1)) if self.files else 0
            if room == 0:
                self.close()
                self.files.append(self.dir / f".stream_{len(self.files):06d}.ids")
                self._f = open(self.files[-1], "wb")
                room = SCRATCH_TOKENS
            self._f.write(data[:room])
            self.count += min(room, data.size)
            data = data[room:]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, lo: int, hi: int, step: int = 1 << 22) -> Iterator[np.ndarray]:
        """The ids [lo, hi), at most `step` at a time."""
        while lo < hi:
            i, at = divmod(lo, SCRATCH_TOKENS)
            n = min(hi - lo, step, SCRATCH_TOKENS - at)
            with open(self.files[i], "rb") as f:
                f.seek(at * self.dtype.itemsize)
                yield np.fromfile(f, dtype=self.dtype, count=n)
            lo += n

    def drop_below(self, pos: int) -> None:
        """Delete the scratch files that hold only ids before `pos`."""
        for i in range(min(pos // SCRATCH_TOKENS, len(self.files))):
            self.files[i].unlink(missing_ok=True)

    def remove(self) -> None:
        self.close()
        for f in self.files:
            f.unlink(missing_ok=True)
