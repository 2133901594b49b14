// The residual stream. The body is a template over the activation type A (float, or bf16
// through load/store: the sum is taken in float and rounded once).

#include "bf16.cuh"

// out[i] = a[i] + b[i]; grid_1d(N).
template <class A> __device__ void residual_forward_impl(A* out, const A* a, const A* b, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  store(out + i, load(a + i) + load(b + i));
}

extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, int N) {
  residual_forward_impl(out, a, b, N);
}

extern "C" __global__ void residual_forward_bf16(bf16* out, const bf16* a, const bf16* b, int N) {
  residual_forward_impl(out, a, b, N);
}
