"""Every kernels/*.cu compiles for Ampere (sm_80) and Hopper (sm_90) with nvcc, warnings as
errors, and with NVRTC (what cupy.RawModule uses at run time).

Needs only the CUDA toolkit or the NVRTC library, no GPU; each check is skipped where its
compiler is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess

import pytest

from crystal.backends.kernels import kernels_dir

SOURCES = sorted(kernels_dir().glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
by_file_and_arch = pytest.mark.parametrize(
    "source, arch", [(s, a) for s in SOURCES for a in ARCHS],
    ids=[f"{s.name}-{a}" for s in SOURCES for a in ARCHS])


def load_nvrtc():
    """libnvrtc (from the toolkit or an nvidia-cuda-nvrtc wheel), or None."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:
        name = ctypes.util.find_library("nvrtc")
        return ctypes.CDLL(name) if name else None


def test_kernel_sources_exist():
    assert SOURCES, f"no .cu files in {kernels_dir()}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not on PATH")
@by_file_and_arch
def test_kernel_file_compiles_with_nvcc_without_warnings(source, arch, tmp_path):
    cubin = tmp_path / f"{source.stem}.cubin"
    done = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "--Werror", "all-warnings",
                           "-o", str(cubin), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc -arch={arch} {source.name}:\n{done.stdout}{done.stderr}"
    assert cubin.stat().st_size > 0


@by_file_and_arch
def test_kernel_file_compiles_with_nvrtc(source, arch):
    nvrtc = load_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc is not installed")
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(),
                                    source.name.encode(), 0, None, None) == 0
    options = (ctypes.c_char_p * 2)(f"-arch={arch.replace('sm_', 'compute_')}".encode(),
                                    f"-I{source.parent}".encode())  # as cupy.RawModule is given
    status = nvrtc.nvrtcCompileProgram(prog, 2, options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    assert status == 0, f"NVRTC {arch} {source.name}:\n{log.value.decode()}"
