"""Reading JSON and TOML: the one place where bytes from a file become Python values.

Whatever the bytes hold (not UTF-8, not JSON, an integer of 5,000 digits, `[` nested 100,000
deep, which overflows the parser's recursion limit) the result is a value or a `CrystalError`
of one line naming the file and the reason; never a traceback. Lists and tables nest at most
MAX_DEPTH deep in a value read, so that whatever recurses over it later (json.dumps answering
the watch page, from deeper in the stack than the parser ran) cannot overflow either. Reading
the file itself is left to the caller (a missing file means different things to different
readers): OSError passes.

`finite=True` (for the watch page, which must send valid JSON): NaN, Infinity and numbers too
large for a float are read as None, so that a response never holds a value JSON cannot write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from crystal.errors import CrystalError

MAX_DEPTH = 128  # serde_json's recursion limit, which the safetensors and tokenizers libraries read with


class _TooDeep(ValueError):
    pass


def _reason(e: BaseException) -> str:
    if isinstance(e, (RecursionError, _TooDeep)):
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text at byte {e.start}"
    return " ".join(str(e).split())  # one line


def _shallow(value):
    """`value`, when its lists and dicts nest at most MAX_DEPTH deep (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []  # containers only, with their depth
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _TooDeep()
        for x in (v.values() if isinstance(v, dict) else v):
            if isinstance(x, (list, dict)):
                stack.append((x, depth + 1))
    return value


def _finite_float(text: str) -> float | None:
    x = float(text)
    return x if math.isfinite(x) else None


def parse_json(data: str | bytes, where: str, *, finite: bool = False):
    """The value of a JSON text (bytes: UTF-8); `where` names it in the error (a path, a line)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        if finite:
            return _shallow(json.loads(text, parse_constant=lambda name: None, parse_float=_finite_float))
        return _shallow(json.loads(text))
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, int too long
        raise CrystalError(f"{where}: not valid JSON ({_reason(e)})") from None


def read_json(path: str | Path, *, finite: bool = False):
    """The value of a JSON file (OSError passes to the caller)."""
    return parse_json(Path(path).read_bytes(), str(path), finite=finite)


def read_toml(path: str | Path) -> dict:
    """The tables of a TOML file (OSError passes to the caller)."""
    import tomllib

    data = Path(path).read_bytes()
    try:
        return _shallow(tomllib.loads(data.decode("utf-8")))
    except (ValueError, RecursionError) as e:  # ValueError: TOMLDecodeError, UnicodeDecodeError
        raise CrystalError(f"{path}: not valid TOML ({_reason(e)})") from None
