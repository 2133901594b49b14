"""The one error type for user mistakes.

Anything raised as `CrystalError` is the user's to fix (a bad flag, a missing file, data that
is too short); the CLI prints it as one line, `error: ...`, and exits 2. Any other exception is
a bug in crystal and keeps its traceback.
"""


class CrystalError(Exception):
    """A user-facing error: bad input, bad configuration, unusable environment."""


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
