// The bias of a matmul out[N,OC] (the product itself is cuBLAS). Bodies are templates over the
// activation type A (float, or bf16 through load/store, math in float); dbias is float32 in both.

#include "bf16.cuh"
#include "column_reduce.cuh"

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

// dbias[o] = sum_i dout[i,o] (written, float32), in two launches (column_reduce.cuh): the order
// depends on N, OC and P alone.
// Stage 1, grid (cdiv(OC, blockDim.x), P): part r = blockIdx.y of the rows (column_part_rows),
// one thread per column, rows in order: partial[r, o] = its sum (partial: float32 [P, OC]).
template <class A>
__device__ void bias_backward_partial_impl(float* partial, const A* dout, int N, int OC) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  int begin, end;
  column_part_rows(N, begin, end);
  float acc = 0.0f;
  for (int i = begin; i < end; ++i) acc += load(dout + (long long)i * OC + o);
  partial[(long long)blockIdx.y * OC + o] = acc;
}

extern "C" __global__ void bias_backward_partial(float* partial, const float* dout, int N, int OC) {
  bias_backward_partial_impl(partial, dout, N, OC);
}

extern "C" __global__ void bias_backward_partial_bf16(float* partial, const bf16* dout, int N,
                                                      int OC) {
  bias_backward_partial_impl(partial, dout, N, OC);
}

// Stage 2, grid_1d(32 * OC): warp o writes dbias[o], the sum of its column's P partials
// (column_sum_of_parts). Float32 partials: no bf16 twin.
extern "C" __global__ void bias_backward_sum(float* dbias, const float* partial, int P, int OC) {
  int o = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  float s = column_sum_of_parts(partial, P, OC, o);
  if ((threadIdx.x & 31) == 0 && o < OC) dbias[o] = s;
}
