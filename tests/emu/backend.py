"""The cuda backend's host code on numpy arrays, with the CPU-emulated kernels (and, for bf16,
numpy stand-ins of cuBLASLt and cuDNN): crystal.backends.cuda.CudaBackend, minus the GPU."""

from __future__ import annotations

import contextlib

import numpy as np

from crystal.backends.cuda import CudaBackend
from emu.build import build


class EmulatedCudaBackend(CudaBackend):
    """CudaBackend with numpy arrays and emulated kernels; streams and events are no-ops.
    precision "bf16" takes `lt` (a cuBLASLt stand-in, required) and `cudnn` (a cuDNN stand-in,
    or None for the cuBLAS + softmax attention path)."""

    def __init__(self, precision: str = "fp32", lt=None, cudnn=None, flash: bool = True):
        super().__init__(precision, block=32, array_module=np, launcher=build().launch, lt=lt, cudnn=cudnn,
                         flash=flash)
        self.name = "cuda-emulated"

    def to_host(self, array):
        return np.asarray(array)

    def sphere_context(self, index):
        return contextlib.nullcontext()

    def record_event(self):
        return None

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass
