// bfloat16 storage for the --precision bf16 kernels: arrays hold bf16, all arithmetic is float32.
// A kernel reads with load() (exact widening), computes in float, and rounds each stored result
// once with store() (round to nearest even). NVRTC has no cuda_bf16.h, so the type is ours; the
// CPU emulator (tests/emu/emu.h, which defines CRYSTAL_EMU) provides bf16 and its two conversions
// itself.
#ifndef CRYSTAL_BF16_CUH
#define CRYSTAL_BF16_CUH

#ifndef CRYSTAL_EMU
// The bits of a __nv_bfloat16: sign, 8 exponent bits, 7 mantissa bits (a float's high half).
struct bf16 {
  unsigned short bits;
};

// Exact: the bf16 bits are the high 16 bits of the float.
__device__ inline float bf16_to_f32(bf16 h) { return __uint_as_float((unsigned)h.bits << 16); }

// Round to nearest even (overflow to +-inf as IEEE does), any NaN -> 0x7FFF: what CUDA's
// __float2bfloat16_rn gives. sm_80+ has the instruction (cuda_bf16.hpp emits the same PTX).
__device__ inline bf16 f32_to_bf16(float f) {
  bf16 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // older GPUs (the fp32 kernels still build there): the same rounding in integers
  unsigned u = __float_as_uint(f);
  h.bits = (u & 0x7fffffffu) > 0x7f800000u
               ? (unsigned short)0x7fffu
               : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#endif
  return h;
}
#endif  // CRYSTAL_EMU

// One kernel body serves both precisions: load() widens an element to float, store() writes a
// float result (rounded once for bf16). For float they are the plain read and write.
__device__ inline float load(const float* p) { return *p; }
__device__ inline float load(const bf16* p) { return bf16_to_f32(*p); }
__device__ inline void store(float* p, float v) { *p = v; }
__device__ inline void store(bf16* p, float v) { *p = f32_to_bf16(v); }

#endif
