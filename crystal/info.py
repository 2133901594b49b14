"""`crystal info`: what this machine gives crystal (versions, BLAS, cores, GPU, nvcc)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _cores() -> str:
    from crystal.spheres import usable_cores

    n = usable_cores()
    return f"{os.cpu_count()} ({n} usable: at most {n} spheres compute at once, the core gate; --cores N to change)"


def describe() -> dict[str, str]:
    from threadpoolctl import threadpool_info

    import crystal

    out = {"crystal": crystal.__version__, "python": platform.python_version(),
           "platform": f"{platform.system()} {platform.machine()}", "cores": _cores()}
    for pkg in ("numpy", "numba", "click", "safetensors", "rich", "tokenizers", "torch", "cupy-cuda13x",
                "cupy-cuda12x", "matplotlib", "mpi4py", "mpich"):
        out[pkg] = _version(pkg)
    blas = [f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, "
            f"{p.get('num_threads')} threads)" for p in threadpool_info() if p.get("user_api") == "blas"]
    out["blas"] = "; ".join(blas) or "unknown"
    import numba

    out["numba threading"] = f"{numba.config.THREADING_LAYER} (crystal uses no numba parallel regions)"
    from crystal.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        out["gpu"] = f"{props['name'].decode()} ({cupy.cuda.runtime.getDeviceCount()} device(s))"
    else:
        out["gpu"] = f"none ({reason})"
    from crystal.world import discover

    world = discover()
    out["ranks"] = (f"rank {world.rank} of {world.size} ({world.launcher}, local rank {world.local_rank})"
                    if world.size > 1 else "1 (no launcher variables)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            out["nvcc"] = f"{nvcc}: {lines.strip().splitlines()[-1]}"
        except (OSError, subprocess.TimeoutExpired):
            out["nvcc"] = nvcc
    else:
        out["nvcc"] = "not found"
    return out
