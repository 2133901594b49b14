"""Atomic file writes: a reader sees the old file or the new one, never a torn one. And the
check every reader of a user's file makes first: regular files only."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from crystal.errors import CrystalError


def check_regular(path: str | Path) -> None:
    """A FIFO, a device or a socket where a file goes is a CrystalError (reading /dev/zero or a
    pipe never ends; opening a FIFO blocks). A missing path is left to the reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return  # directories are the callers' own errors
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise CrystalError(f"{path} is {kind}; give a regular file")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: str | Path, chunks) -> None:
    """Temp file in the same directory, written a chunk (bytes, or any buffer: a numpy array) at a
    time, fsync, rename over the target, fsync the directory. A failure (a full disk) removes the
    temp file and raises OSError naming `path`, the file the caller asked for (not the temp name)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
