"""Encoding a batch of pieces to ids, in `crystal prepare`'s process or in a worker process.

A batch is a list of text pieces and None (a document boundary: the end-of-text id); its ids are
uint32 in an `array.array` (its bytes are what a worker sends back). Nothing here imports numpy:
a spawned worker imports this module, the tokenizers library and crystal.wordcache only, so it
starts in a tenth of a second.
"""

from __future__ import annotations

import os
import signal
from array import array

from crystal.wordcache import WordCache, applies

assert array("I").itemsize == 4  # uint32 ids


def word_cache(tok) -> WordCache | None:
    """A WordCache for `tok` where it applies (crystal.wordcache), else None."""
    return WordCache(tok) if applies(tok) else None


def encode_items(tok, items: list, eot: int | None, threads: bool, words: WordCache | None = None) -> array:
    """uint32 ids of a batch: each piece encoded by itself (a `tokenizers.Tokenizer`; threads:
    by its encode_batch, on the library's threads; words: the library's ids of the pieces the
    cache can give), `eot` for each None."""
    out = [None if p is None or words is None else words.encode(p) for p in items]
    texts = [p for p, ids in zip(items, out) if p is not None and ids is None]
    if threads:
        encoded = iter(tok.encode_batch(texts, add_special_tokens=False))
    else:
        encoded = (tok.encode(t, add_special_tokens=False) for t in texts)
    ids = array("I")
    for p, cached in zip(items, out):
        if p is None:
            ids.append(eot)
        else:
            ids.extend(cached if cached is not None else next(encoded).ids)
    return ids


_WORKER: dict = {}  # a worker process's own tokenizer and cache (set by init_worker; never in the parent)


def init_worker(tok_file: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker, one core
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_file)
    tok.no_truncation()
    tok.no_padding()
    _WORKER["tok"], _WORKER["words"] = tok, word_cache(tok)


def encode_task(items: list, eot: int | None) -> bytes:
    return encode_items(_WORKER["tok"], items, eot, threads=False, words=_WORKER["words"]).tobytes()
