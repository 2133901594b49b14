"""What the emulated-kernel test files share: the kernels, built once per test session (and cached
on disk across sessions), and a registry of which test launches which kernel."""

from __future__ import annotations

import functools

from emu.build import EmulatedKernels, build

_kernels: EmulatedKernels | None = None


def gpu() -> EmulatedKernels:
    """The emulated kernels of kernels/*.cu."""
    global _kernels
    if _kernels is None:
        _kernels = build()
    return _kernels


class Coverage:
    """kernel name -> the first test that launches it, filled at import (so independent of test
    order) by the `covers` decorator; a decorated test fails unless it launches them all."""

    def __init__(self):
        self.covered: dict[str, str] = {}

    def covers(self, *names):
        def register(test):
            for name in names:
                self.covered.setdefault(name, test.__name__)

            @functools.wraps(test)
            def run(*args, **kwargs):
                gpu().launched.clear()
                test(*args, **kwargs)
                missing = set(names) - gpu().launched
                assert not missing, f"{test.__name__} never launched {sorted(missing)}"
            return run
        return register
