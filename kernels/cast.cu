// Precision casts of flat buffers: the bf16 copy of the float32 master weights, refreshed after
// every optimizer step in --precision bf16.

#include "bf16.cuh"

// out[i] = bf16(in[i]), round to nearest even (NaN -> 0x7FFF); grid_1d(n).
extern "C" __global__ void cast_to_bf16(bf16* out, const float* in, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = f32_to_bf16(in[i]);
}
