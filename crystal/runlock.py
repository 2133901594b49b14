"""One writer per run directory: an exclusive flock on RUN/.crystal.lock.

A process that writes a run (`crystal train`, `--resume`, `--overwrite`) takes the lock before its
first write and holds it until it ends; its pid is written into the file. The kernel releases an
flock when its process dies, however it dies (kill -9 included), so a held lock always means a
live writer and a lock is never stale. A second writer is refused with one line naming the
holder's pid, and so is an export into a held directory; readers (eval, sample, watch, plot)
never take the lock. The file stays behind when the run ends: unlinking it would race with a
process that has just opened it (each would then lock a different inode).

The lock is per open file description, so two RunLocks conflict inside one process as they do
across processes (the tests take it from the test process to play the first writer).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from crystal.errors import CrystalError

LOCK_FILE = ".crystal.lock"
PROBE_RETRIES = 5


class RunLock:
    """The held lock of one run directory (`acquire`); `release` (or process exit) frees it."""

    def __init__(self, run: Path, fd: int):
        self.run, self._fd = run, fd

    @classmethod
    def acquire(cls, run: str | Path) -> "RunLock":
        """Lock `run` (an existing directory) for this process and write its pid into the lock
        file, or a CrystalError naming the process that holds it."""
        run = Path(run)
        try:
            fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CrystalError(f"cannot write run directory {run}: {e.strerror or e}") from None
        for attempt in range(PROBE_RETRIES + 1):  # a `holder` probe holds a shared lock for a moment
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == PROBE_RETRIES:
                    os.close(fd)
                    raise CrystalError(in_use(run)) from None
                time.sleep(0.02)
            except OSError as e:
                os.close(fd)
                raise CrystalError(f"cannot lock run directory {run}: {e.strerror or e}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise CrystalError(f"cannot write {run / LOCK_FILE}: {e.strerror or e}") from None
        return cls(run, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    def __del__(self):  # a RunDir dropped without close() (an exception in a test) frees its run
        self.release()


def holder(run: str | Path) -> int | None:
    """The pid of the process holding `run`'s lock (0: held, pid unknown); None when it is free.
    Probes with a shared lock, taken and dropped at once; a missing lock file is a free run."""
    path = Path(run) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def check_free(run: str | Path) -> None:
    """A CrystalError naming the holder when a writer holds `run`."""
    if holder(run) is not None:
        raise CrystalError(in_use(run))


def in_use(run: str | Path) -> str:
    pid = _pid_in(Path(run) / LOCK_FILE)
    who = f"process {pid}" if pid else "another process"
    return (f"{run} is in use: {who} is writing it (it holds {Path(run) / LOCK_FILE}); "
            "wait for it to end or choose another directory")


def _pid_in(path: Path) -> int:
    """The pid the holder wrote; it writes it just after locking, so an empty file is retried
    for a moment (0 when none appears)."""
    for _ in range(20):
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return 0
