"""Backends map the op protocol onto a device: `cpu` (numba + NumPy BLAS) or `cuda`."""

from __future__ import annotations

from crystal.errors import CrystalError


def cuda_unavailable_reason() -> str | None:
    """Why `--device cuda` cannot run here, or None when it can."""
    return "the cuda backend is not built yet in this version of crystal; use --device cpu"


def get_backend(device: str = "auto"):
    """'cpu', 'cuda', or 'auto' (cuda when usable, else cpu)."""
    if device == "auto":
        device = "cuda" if cuda_unavailable_reason() is None else "cpu"
    if device == "cpu":
        from crystal.backends.cpu import CpuBackend

        return CpuBackend()
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise CrystalError(f"--device cuda: {reason}")
        raise CrystalError("--device cuda: not available")
    raise CrystalError(f"unknown device {device!r}; choose auto, cpu or cuda")
