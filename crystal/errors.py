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
