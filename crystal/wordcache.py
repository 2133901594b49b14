"""A GPT-2-style byte-level BPE's ids for ASCII text, through a cache of each word's ids.

`tokenizers` encodes a text as: added tokens split off, the normalizer, the pre-tokenizer's
pieces ("words"), and the model run on each word by itself. For a tokenizer with no normalizer,
the ByteLevel pre-tokenizer with GPT-2's regex, and a BPE model without dropout, the ids of a
text with no added token in it are therefore the concatenation of each word's own ids; and on
ASCII text GPT-2's regex

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

reads \\p{L} as [A-Za-z], \\p{N} as [0-9] and \\s as [\\t\\n\\v\\f\\r ] (Unicode's White_Space
among the ASCII characters), which Python's `re` matches with the same leftmost-first
backtracking. So an ASCII text is cut into words here, each word's ids are the library's own
(encoded once, then looked up), and the result is the library's ids for the whole text: the
library pays for its offsets, its token strings and the BPE of every word each time; a corpus
repeats its words. Anything else (a non-ASCII text, an added token's text inside it, another
tokenizer) is not handled here: `encode` gives None and the caller asks the library.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import chain

_WS = "\\t\\n\\x0b\\x0c\\r "  # Unicode White_Space among the ASCII characters
WORDS = re.compile(f"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"
                   f"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
LIMIT = 1 << 17  # words held; past it the cache starts again (its memory stays ~30 MB)


def applies(tok) -> bool:
    """Whether `tok` (a tokenizers.Tokenizer) encodes word by word as this module assumes."""
    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
            and model.get("type") == "BPE" and model.get("dropout") in (None, 0, 0.0))


class WordCache:
    """The ids of ASCII texts by the cache of their words' ids (one per process: not shared)."""

    def __init__(self, tok):
        self.tok = tok
        added = [a.content for a in tok.get_added_tokens_decoder().values() if a.content]
        self.added = re.compile("|".join(map(re.escape, added))) if added else None
        self.ids: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> array | None:
        """uint32 ids of `text` (array "I") = the library's, or None where this module does not apply."""
        if not text.isascii() or (self.added is not None and self.added.search(text)):
            return None
        words = WORDS.findall(text)
        ids = self.ids
        parts = [ids.get(w) for w in words]
        if None in parts:
            if len(ids) > LIMIT:
                ids.clear()
            new = list(dict.fromkeys(w for w in words if w not in ids))
            for w, e in zip(new, self.tok.encode_batch_fast(new, add_special_tokens=False)):
                ids[w] = tuple(e.ids)
            parts = [ids[w] for w in words]
        return array("I", chain.from_iterable(parts))
