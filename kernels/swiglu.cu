// SwiGLU (Llama's MLP nonlinearity): gate and up come from one product, gu[N, 2I] = [gate | up]
// per row; out[N, I] = silu(gate) * up, silu(x) = x * sigmoid(x). Bodies are templates over the
// activation type A (float, or bf16 through load/store, math in float).

#include "bf16.cuh"

// out[i, k] = g s u with g = gu[i, k], u = gu[i, I + k], s = 1 / (1 + exp(-g)); grid_1d(N*I).
template <class A> __device__ void swiglu_forward_impl(A* out, const A* gu, int N, int I) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * I) return;
  long long row = j / I * 2 * I;
  int k = (int)(j % I);
  float g = load(gu + row + k), u = load(gu + row + I + k);
  float s = 1.0f / (1.0f + expf(-g));
  store(out + j, g * s * u);
}

extern "C" __global__ void swiglu_forward(float* out, const float* gu, int N, int I) {
  swiglu_forward_impl(out, gu, N, I);
}

extern "C" __global__ void swiglu_forward_bf16(bf16* out, const bf16* gu, int N, int I) {
  swiglu_forward_impl(out, gu, N, I);
}

// dgate = dout u s (1 + g (1 - s)), dup = dout g s, written into dgu[i] = [dgate | dup] (the op
// protocol: dgu does not alias gu). grid_1d(N*I).
template <class A>
__device__ void swiglu_backward_impl(A* dgu, const A* gu, const A* dout, int N, int I) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * I) return;
  long long row = j / I * 2 * I;
  int k = (int)(j % I);
  float g = load(gu + row + k), u = load(gu + row + I + k), d = load(dout + j);
  float s = 1.0f / (1.0f + expf(-g));
  store(dgu + row + k, d * u * s * (1.0f + g * (1.0f - s)));
  store(dgu + row + I + k, d * (g * s));
}

extern "C" __global__ void swiglu_backward(float* dgu, const float* gu, const float* dout, int N,
                                           int I) {
  swiglu_backward_impl(dgu, gu, dout, N, I);
}

extern "C" __global__ void swiglu_backward_bf16(bf16* dgu, const bf16* gu, const bf16* dout,
                                                int N, int I) {
  swiglu_backward_impl(dgu, gu, dout, N, I);
}
