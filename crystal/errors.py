"""The one error type for user mistakes.

Anything raised as `CrystalError` is the user's to fix (a bad flag, a missing file, data that
is too short); the CLI prints it as one line, `error: ...`, and exits 2. Any other exception is
a bug in crystal and keeps its traceback. Its message is where a value the user gave is shown,
so a number of more than MAX_DIGITS digits in it is shortened (`abbreviate_numbers`).
"""

import re

MAX_DIGITS = 20  # a 64-bit integer has at most 20
# a run of digits that is a number by itself: not part of a word, a path or a decimal fraction
_LONG_NUMBER = re.compile(r"(?<![\w./\\])\d{%d,}(?![\w/\\])" % (MAX_DIGITS + 1))


def abbreviate_numbers(text: str) -> str:
    """Every number of more than MAX_DIGITS digits as its first 8 and last 4 digits and its length:
    10**300 reads `10000000...0000 (301 digits)`."""
    return _LONG_NUMBER.sub(lambda m: f"{m[0][:8]}...{m[0][-4:]} ({len(m[0])} digits)", text)


class CrystalError(Exception):
    """A user-facing error: bad input, bad configuration, unusable environment."""

    def __init__(self, message: str = ""):
        super().__init__(abbreviate_numbers(str(message)))


class SphereFailure(RuntimeError):
    """A worker sphere raised; carries the sphere index and the original exception."""

    def __init__(self, sphere: int, error: BaseException):
        super().__init__(f"sphere {sphere} failed: {type(error).__name__}: {error}")
        self.sphere = sphere
        self.error = error


class NonFiniteError(Exception):
    """The loss or the gradient norm of a step is not finite; training stopped before applying it."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: str | None):
        where = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written"
        super().__init__(f"non-finite {'loss' if loss != loss or abs(loss) == float('inf') else 'gradient norm'} "
                         f"at step {step} (loss {loss}, grad norm {grad_norm}){where}")
        self.step, self.checkpoint = step, checkpoint


class GraphCaptureError(RuntimeError):
    """Work that a CUDA graph cannot hold was issued inside a capture, or the capture failed
    (crystal.graphs; the trainer falls back to eager steps under --cuda-graphs auto)."""
