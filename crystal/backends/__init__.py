"""Backends map the op protocol onto a device: `cpu` (numba + NumPy BLAS) or `cuda` (cupy)."""

from __future__ import annotations

from crystal.config import PRECISIONS
from crystal.errors import CrystalError


def cuda_unavailable_reason() -> str | None:
    """Why `--device cuda` cannot run here (one line), or None when it can."""
    from crystal.backends.cuda import unavailable_reason

    return unavailable_reason()


def resolve_device(device: str = "auto") -> str:
    """'auto' becomes 'cuda' when cupy sees a usable GPU, else 'cpu'."""
    if device == "auto":
        return "cuda" if cuda_unavailable_reason() is None else "cpu"
    if device not in ("cpu", "cuda"):
        raise CrystalError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def get_backend(device: str = "auto", precision: str = "fp32", gpu: int = 0, graphs: bool = False):
    """The backend for 'cpu', 'cuda' or 'auto'. precision fp32|tf32|bf16 applies to cuda (the
    cpu backend always computes in fp32, and refuses bf16); gpu is a rank's LOCAL_RANK (its
    CUDA device, modulo the devices present); graphs: the run may capture CUDA graphs (cuda)."""
    if precision not in PRECISIONS:
        raise CrystalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    requested = device
    device = resolve_device(device)
    if device == "cpu" and precision == "bf16":
        why = f" ({cuda_unavailable_reason()})" if requested == "auto" else ""
        raise CrystalError(f"--precision bf16 needs a CUDA GPU; the device is cpu{why}")
    if device == "cpu":
        from crystal.backends.cpu import CpuBackend

        return CpuBackend()
    reason = cuda_unavailable_reason()
    if reason:
        raise CrystalError(f"--device cuda: {reason}")
    from crystal.backends.cuda import CudaBackend

    return CudaBackend(precision, gpu=gpu, graphs=graphs)
