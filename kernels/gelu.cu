// GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3).
// Bodies are templates over the activation type A (float, or bf16 through load/store, math in
// float).

#include "bf16.cuh"

constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2/pi)

// out[i] = 0.5 x (1 + tanh u); grid_1d(N).
template <class A> __device__ void gelu_forward_impl(A* out, const A* inp, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float x = load(inp + i);
  store(out + i, 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x))));
}

extern "C" __global__ void gelu_forward(float* out, const float* inp, int N) {
  gelu_forward_impl(out, inp, N);
}

extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, int N) {
  gelu_forward_impl(out, inp, N);
}

// dinp[i] = (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u') dout[i],
// u' = sqrt(2/pi) (1 + 3*0.044715 x^2); grid_1d(N). dinp may alias dout.
template <class A>
__device__ void gelu_backward_impl(A* dinp, const A* inp, const A* dout, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float x = load(inp + i);
  float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
  float du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
  store(dinp + i, (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du) * load(dout + i));
}

extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, int N) {
  gelu_backward_impl(dinp, inp, dout, N);
}

extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout,
                                              int N) {
  gelu_backward_impl(dinp, inp, dout, N);
}
