"""CPU emulation of the CUDA kernels: emu.h maps the CUDA subset onto host threads, build.py
compiles kernels/*.cu with it and launches the kernels through ctypes."""
