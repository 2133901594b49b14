// The bias of a matmul out[N,OC] (the product itself is cuBLAS). Bodies are templates over the
// activation type A (float, or bf16 through load/store, math in float); dbias is float32 in both.

#include "bf16.cuh"

// out[i,o] += bias[o]; grid_1d(N*OC).
template <class A> __device__ void bias_forward_impl(A* out, const A* bias, int N, int OC) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * OC) return;
  store(out + j, load(out + j) + load(bias + j % OC));
}

extern "C" __global__ void bias_forward(float* out, const float* bias, int N, int OC) {
  bias_forward_impl(out, bias, N, OC);
}

extern "C" __global__ void bias_forward_bf16(bf16* out, const bf16* bias, int N, int OC) {
  bias_forward_impl(out, bias, N, OC);
}

// dbias[o] = sum_i dout[i,o], rows i = 0..N-1 in order (written); grid_1d(OC): thread per column.
template <class A> __device__ void bias_backward_impl(float* dbias, const A* dout, int N, int OC) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  float acc = 0.0f;
  for (int i = 0; i < N; ++i) acc += load(dout + (long long)i * OC + o);
  dbias[o] = acc;
}

extern "C" __global__ void bias_backward(float* dbias, const float* dout, int N, int OC) {
  bias_backward_impl(dbias, dout, N, OC);
}

extern "C" __global__ void bias_backward_bf16(float* dbias, const bf16* dout, int N, int OC) {
  bias_backward_impl(dbias, dout, N, OC);
}
