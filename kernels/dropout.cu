// Dropout: a mask hashed from (key, element index), identical to crystal.dropout.keep_mask and
// the cpu backend's kernel, so every backend and sphere drops the same elements. The body is a
// template over the activation type A (float, or bf16 through load/store, math in float).
// The key is read from device memory, keys[slot]: a captured CUDA graph replays with the keys
// of each new step written into the same slots (crystal.backends.cuda, staging).

#include "bf16.cuh"

// out[i] = keep(keys[slot], i) ? inp[i] * scale : 0, keep <=> high 32 bits of splitmix64's finalizer
// on key + (i + 1) * golden are >= threshold; out may be inp; grid_1d(N).
template <class A>
__device__ void dropout_impl(A* out, const A* inp, const long long* keys, int slot,
                             long long threshold, float scale, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  long long key = keys[slot];
  unsigned long long z = (unsigned long long)key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  store(out + i, (z >> 32) >= (unsigned long long)threshold ? load(inp + i) * scale : 0.0f);
}

extern "C" __global__ void dropout(float* out, const float* inp, const long long* keys, int slot,
                                   long long threshold, float scale, int N) {
  dropout_impl(out, inp, keys, slot, threshold, scale, N);
}

extern "C" __global__ void dropout_bf16(bf16* out, const bf16* inp, const long long* keys,
                                        int slot, long long threshold, float scale, int N) {
  dropout_impl(out, inp, keys, slot, threshold, scale, N);
}
