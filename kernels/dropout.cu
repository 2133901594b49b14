// Dropout: a mask hashed from (key, element index), identical to crystal.dropout.keep_mask and
// the cpu backend's kernel, so every backend and sphere drops the same elements.

// out[i] = keep(key, i) ? inp[i] * scale : 0, keep <=> high 32 bits of splitmix64's finalizer
// on key + (i + 1) * golden are >= threshold; out may be inp; grid_1d(N).
extern "C" __global__ void dropout(float* out, const float* inp, long long key, long long threshold,
                                   float scale, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  unsigned long long z = (unsigned long long)key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  out[i] = (z >> 32) >= (unsigned long long)threshold ? inp[i] * scale : 0.0f;
}
