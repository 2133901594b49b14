// RMSNorm over the last axis of inp[N,C] (Llama): out = w * x * rstd, rstd = 1/sqrt(mean(x^2)+eps).
// Row kernels run one block per row; any blockDim.x that is a multiple of 32 (up to 1024) works,
// and the reduction order is fixed by it. Each body is a template over the activation type A
// (float, or bf16 through load/store, math in float); rstd and the weight gradient dw are float32
// in both. dw is a column sum over the rows in two launches (column_reduce.cuh).

#include "bf16.cuh"
#include "block_reduce.cuh"
#include "column_reduce.cuh"

// xhat = x * rstd, out = xhat * w, rstd = 1/sqrt(sum(x^2)/C + eps); saves rstd[i].
// grid_rows(N): one block per row.
template <class A>
__device__ void rmsnorm_forward_impl(A* out, float* rstd, const A* inp, const A* w, int N, int C,
                                     float eps) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const A* x = inp + (long long)i * C;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += load(x + c) * load(x + c);
  float r = 1.0f / sqrtf(block_sum(ss) / C + eps);
  A* y = out + (long long)i * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) store(y + c, load(x + c) * r * load(w + c));
  if (threadIdx.x == 0) rstd[i] = r;
}

extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* inp,
                                           const float* w, int N, int C, float eps) {
  rmsnorm_forward_impl(out, rstd, inp, w, N, C, eps);
}

extern "C" __global__ void rmsnorm_forward_bf16(bf16* out, float* rstd, const bf16* inp,
                                                const bf16* w, int N, int C, float eps) {
  rmsnorm_forward_impl(out, rstd, inp, w, N, C, eps);
}

// dxhat = w*dout, xhat = x*rstd:
// dinp[i,c] += rstd * (dxhat - xhat * mean_c(dxhat*xhat)) (accumulated; in bf16 the old value
// is widened, the sum taken in float and rounded once). grid_rows(N): one block per row.
template <class A>
__device__ void rmsnorm_backward_dinp_impl(A* dinp, const A* dout, const A* inp, const A* w,
                                           const float* rstd, int N, int C) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  long long row = (long long)i * C;
  float r = rstd[i];
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    s += load(w + c) * load(dout + row + c) * (load(inp + row + c) * r);
  float dxhat_xhat_mean = block_sum(s) / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float xhat = load(inp + row + c) * r;
    float dxhat = load(w + c) * load(dout + row + c);
    store(dinp + row + c, load(dinp + row + c) + (dxhat - xhat * dxhat_xhat_mean) * r);
  }
}

extern "C" __global__ void rmsnorm_backward_dinp(float* dinp, const float* dout, const float* inp,
                                                 const float* w, const float* rstd, int N,
                                                 int C) {
  rmsnorm_backward_dinp_impl(dinp, dout, inp, w, rstd, N, C);
}

extern "C" __global__ void rmsnorm_backward_dinp_bf16(bf16* dinp, const bf16* dout,
                                                      const bf16* inp, const bf16* w,
                                                      const float* rstd, int N, int C) {
  rmsnorm_backward_dinp_impl(dinp, dout, inp, w, rstd, N, C);
}

// dw[c] = sum_i xhat[i,c]*dout[i,c] (written, float32), in two launches (column_reduce.cuh): the
// order depends on N, C and P alone.
// Stage 1, grid (cdiv(C, blockDim.x), P): part r = blockIdx.y of the rows (column_part_rows),
// one thread per column, rows in order: partial[r, c] = its sum (partial: float32 [P, C]).
template <class A>
__device__ void rmsnorm_backward_dw_partial_impl(float* partial, const A* dout, const A* inp,
                                                 const float* rstd, int N, int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  int begin, end;
  column_part_rows(N, begin, end);
  float sw = 0.0f;
  for (int i = begin; i < end; ++i) {
    long long j = (long long)i * C + c;
    sw += (load(inp + j) * rstd[i]) * load(dout + j);
  }
  partial[(long long)blockIdx.y * C + c] = sw;
}

extern "C" __global__ void rmsnorm_backward_dw_partial(float* partial, const float* dout,
                                                       const float* inp, const float* rstd, int N,
                                                       int C) {
  rmsnorm_backward_dw_partial_impl(partial, dout, inp, rstd, N, C);
}

extern "C" __global__ void rmsnorm_backward_dw_partial_bf16(float* partial, const bf16* dout,
                                                            const bf16* inp, const float* rstd,
                                                            int N, int C) {
  rmsnorm_backward_dw_partial_impl(partial, dout, inp, rstd, N, C);
}

// Stage 2, grid_1d(32 * C): warp c writes dw[c], the sum of its column's P partials
// (column_sum_of_parts). Float32 partials: no bf16 twin.
extern "C" __global__ void rmsnorm_backward_dw_sum(float* dw, const float* partial, int P, int C) {
  int c = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  float s = column_sum_of_parts(partial, P, C, c);
  if ((threadIdx.x & 31) == 0 && c < C) dw[c] = s;
}

// Fused residual + RMSNorm (the pre-norm block's `x = x + f(x); h = norm(x)`): res_out = a + b
// (stored in the activation type, rounded once), then out, rstd = rmsnorm_forward of the stored
// res_out row: bit for bit residual_forward followed by rmsnorm_forward, in one launch. Every
// thread writes the res_out elements c = threadIdx.x + k*blockDim.x and the rmsnorm body reads
// exactly those back (its loops stride the same way): no barrier is needed between the phases.
// res_out may alias a or b. grid_rows(N): one block per row.
template <class A>
__device__ void residual_rmsnorm_forward_impl(A* res_out, A* out, float* rstd, const A* a,
                                              const A* b, const A* w, int N, int C, float eps) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  long long row = (long long)i * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    store(res_out + row + c, load(a + row + c) + load(b + row + c));
  rmsnorm_forward_impl(out, rstd, res_out, w, N, C, eps);
}

extern "C" __global__ void residual_rmsnorm_forward(float* res_out, float* out, float* rstd,
                                                    const float* a, const float* b,
                                                    const float* w, int N, int C, float eps) {
  residual_rmsnorm_forward_impl(res_out, out, rstd, a, b, w, N, C, eps);
}

extern "C" __global__ void residual_rmsnorm_forward_bf16(bf16* res_out, bf16* out, float* rstd,
                                                         const bf16* a, const bf16* b,
                                                         const bf16* w, int N, int C, float eps) {
  residual_rmsnorm_forward_impl(res_out, out, rstd, a, b, w, N, C, eps);
}
