"""Compile kernels/*.cu with g++ and the emulation header, and launch the kernels via ctypes.

Each `foo.cu` is compiled once into `foo-<hash>.so` (the hash covers the source, emu.h and the
launchers, so an edit rebuilds and an unchanged file is reused across sessions). The .so holds
one `extern "C" launch_<name>(gx, gy, gz, bx, by, bz, args...)` per kernel, generated from the
`KERNELS` table of crystal/backends/kernels.py; `emu_launch` static_asserts that the table's
argument kinds match the kernel's C++ signature, so a mismatch fails the build. `build_source`
compiles a small host wrapper the same way, for testing the headers' device functions.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crystal.backends.kernels import KERNELS, kernels_dir

EMU_HEADER = Path(__file__).with_name("emu.h")
CXX = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w"]
CPP_TYPE = {"ptr": "void*", "i32": "int", "i64": "long long", "f32": "float", "f64": "double"}
C_TYPE = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong,
          "f32": ctypes.c_float, "f64": ctypes.c_double}
GLOBAL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def parse_global_kernels(directory: Path | None = None) -> dict[str, str]:
    """{kernel name: file name} of every `extern "C" __global__` function in kernels/*.cu."""
    found = {}
    for cu in sorted((directory or kernels_dir()).glob("*.cu")):
        for name in GLOBAL_RE.findall(cu.read_text()):
            found[name] = cu.name
    return found


def launchers_source(cu: Path) -> str:
    """The .cu itself followed by one extern "C" launcher per KERNELS entry of that file."""
    lines = [f'#include "{cu.resolve()}"']
    for k in (k for k in KERNELS.values() if k.file == cu.name):
        params = "".join(f", {CPP_TYPE[a]} a{i}" for i, a in enumerate(k.args))
        args = "".join(f", emu_ptr{{a{i}}}" if a == "ptr" else f", a{i}"
                       for i, a in enumerate(k.args))
        lines.append(
            f'extern "C" void launch_{k.name}(unsigned gx, unsigned gy, unsigned gz, '
            f"unsigned bx, unsigned by, unsigned bz{params}) {{\n"
            f"  emu_launch({k.name}, dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}{args});\n}}")
    return "\n".join(lines) + "\n"


def _compile(cu: Path, cache: Path) -> Path:
    return _compile_source(launchers_source(cu), cu.stem, cu.parent, cache, cu.read_text())


def _compile_source(source: str, stem: str, include: Path, cache: Path, extra: str = "") -> Path:
    """`source` compiled with emu.h into cache/<stem>-<hash>.so (reused while nothing changed)."""
    headers = [h.read_text() for h in sorted(include.glob("*.cuh"))]  # what the .cu includes
    digest = hashlib.sha256("\0".join(
        [source, extra, *headers, EMU_HEADER.read_text(), " ".join(CXX)]).encode()).hexdigest()
    lib = cache / f"{stem}-{digest[:16]}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / f"{stem}_emu.cpp", Path(tmp) / "lib.so"
        src.write_text(source)
        done = subprocess.run([*CXX, "-include", str(EMU_HEADER), f"-I{include}", "-o", str(out),
                               str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulated build of {stem} failed:\n{done.stderr}")
        os.replace(out, lib)  # atomic: a concurrent session sees the whole file or none
    return lib


def build_source(source: str, stem: str, cache: Path | None = None) -> ctypes.CDLL:
    """Host C++ `source` (extern "C" functions, free to #include kernels/*.cuh) compiled with
    emu.h and loaded: for testing the headers' device functions directly."""
    cache = Path(cache or Path(tempfile.gettempdir()) / "crystal-emu-kernels")
    cache.mkdir(parents=True, exist_ok=True)
    return ctypes.CDLL(str(_compile_source(source, stem, kernels_dir(), cache)))


class EmulatedKernels:
    """`launch(name, grid, block, *args)` runs kernel<<<grid, block>>>(args) on the CPU.

    Arrays are passed as pointers to their (C-contiguous) data, None as NULL (as cupy does);
    scalars are converted to the kind the KERNELS table gives. Every launched name is added to `launched`. Launches from
    several threads (sphere threads) run one at a time: each .so has its own copy of the
    emulator's globals (`__shared__` statics, the block barrier), so only one grid may run.
    """

    def __init__(self, libs: dict[str, ctypes.CDLL]):
        self._fns = {}
        for k in KERNELS.values():
            fn = getattr(libs[k.file], f"launch_{k.name}")
            fn.argtypes = [ctypes.c_uint] * 6 + [C_TYPE[a] for a in k.args]
            fn.restype = None
            self._fns[k.name] = fn
        self.launched: set[str] = set()
        self._one_at_a_time = threading.Lock()

    def launch(self, name: str, grid, block: int, *args) -> None:
        kinds = KERNELS[name].args
        assert len(args) == len(kinds), f"{name} takes {len(kinds)} arguments"
        assert block % 32 == 0 and 32 <= block <= 1024, "blockDim.x: a multiple of 32, <= 1024"
        values = []
        for kind, a in zip(kinds, args):
            if kind == "ptr" and a is None:  # a NULL pointer, as cupy passes None
                values.append(None)
            elif kind == "ptr":
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous, f"{name}: bad array"
                values.append(a.ctypes.data)
            else:
                values.append(a)
        gx, gy, gz = grid
        with self._one_at_a_time:
            self._fns[name](gx, gy, gz, block, 1, 1, *values)
            self.launched.add(name)


def build(cache: Path | None = None) -> EmulatedKernels:
    """Compile (or reuse) one .so per kernels/*.cu, in parallel, and load them."""
    cache = Path(cache or Path(tempfile.gettempdir()) / "crystal-emu-kernels")
    cache.mkdir(parents=True, exist_ok=True)
    files = sorted(kernels_dir().glob("*.cu"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        libs = dict(zip((f.name for f in files), pool.map(lambda f: _compile(f, cache), files)))
    return EmulatedKernels({name: ctypes.CDLL(str(lib)) for name, lib in libs.items()})
