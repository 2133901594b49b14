// LayerNorm over the last axis of inp[N,C]. Row kernels run one block per row; any blockDim.x
// that is a multiple of 32 (up to 1024) works, and the reduction order is fixed by it.
// Each body is a template over the activation type A (float, or bf16 through load/store, math
// in float); mean, rstd and the parameter gradients dw, db are float32 in both. dw, db are column
// sums over the rows in two launches (column_reduce.cuh).

#include "bf16.cuh"
#include "block_reduce.cuh"
#include "column_reduce.cuh"

// out = (x - mean) * rstd * w + b with mean, var (two-pass) over the row, rstd = 1/sqrt(var+eps);
// saves mean[i], rstd[i]. grid_rows(N): one block per row.
template <class A>
__device__ void layernorm_forward_impl(A* out, float* mean, float* rstd, const A* inp,
                                       const A* w, const A* b, int N, int C, float eps) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const A* x = inp + (long long)i * C;
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s += load(x + c);
  float m = block_sum(s) / C;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (load(x + c) - m) * (load(x + c) - m);
  float r = 1.0f / sqrtf(block_sum(ss) / C + eps);
  A* y = out + (long long)i * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    store(y + c, (load(x + c) - m) * r * load(w + c) + load(b + c));
  if (threadIdx.x == 0) {
    mean[i] = m;
    rstd[i] = r;
  }
}

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd,
                                             const float* inp, const float* w, const float* b,
                                             int N, int C, float eps) {
  layernorm_forward_impl(out, mean, rstd, inp, w, b, N, C, eps);
}

extern "C" __global__ void layernorm_forward_bf16(bf16* out, float* mean, float* rstd,
                                                  const bf16* inp, const bf16* w, const bf16* b,
                                                  int N, int C, float eps) {
  layernorm_forward_impl(out, mean, rstd, inp, w, b, N, C, eps);
}

// dnorm = w*dout, norm = (x-mean)*rstd:
// dinp[i,c] += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm*norm)) (accumulated; in bf16
// the old value is widened, the sum taken in float and rounded once). grid_rows(N): block per row.
template <class A>
__device__ void layernorm_backward_dinp_impl(A* dinp, const A* dout, const A* inp, const A* w,
                                             const float* mean, const float* rstd, int N, int C) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  long long row = (long long)i * C;
  float m = mean[i], r = rstd[i];
  float s1 = 0.0f, s2 = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float dnorm = load(w + c) * load(dout + row + c);
    s1 += dnorm;
    s2 += dnorm * (load(inp + row + c) - m) * r;
  }
  float dnorm_mean = block_sum(s1) / C;
  float dnorm_norm_mean = block_sum(s2) / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float norm = (load(inp + row + c) - m) * r;
    float dnorm = load(w + c) * load(dout + row + c);
    store(dinp + row + c,
          load(dinp + row + c) + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r);
  }
}

extern "C" __global__ void layernorm_backward_dinp(float* dinp, const float* dout,
                                                   const float* inp, const float* w,
                                                   const float* mean, const float* rstd, int N,
                                                   int C) {
  layernorm_backward_dinp_impl(dinp, dout, inp, w, mean, rstd, N, C);
}

extern "C" __global__ void layernorm_backward_dinp_bf16(bf16* dinp, const bf16* dout,
                                                        const bf16* inp, const bf16* w,
                                                        const float* mean, const float* rstd,
                                                        int N, int C) {
  layernorm_backward_dinp_impl(dinp, dout, inp, w, mean, rstd, N, C);
}

// dw[c] = sum_i norm[i,c]*dout[i,c], db[c] = sum_i dout[i,c] (written, float32), in two
// launches (column_reduce.cuh): the order depends on N, C and P alone.
// Stage 1, grid (cdiv(C, blockDim.x), P): part r = blockIdx.y of the rows (column_part_rows),
// one thread per column, rows in order: partial[r, c] = its sum for dw, partial[P + r, c] for db
// (partial: float32 [2P, C]).
template <class A>
__device__ void layernorm_backward_dwdb_partial_impl(float* partial, const A* dout, const A* inp,
                                                     const float* mean, const float* rstd, int N,
                                                     int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  int begin, end;
  column_part_rows(N, begin, end);
  float sw = 0.0f, sb = 0.0f;
  for (int i = begin; i < end; ++i) {
    long long j = (long long)i * C + c;
    float norm = (load(inp + j) - mean[i]) * rstd[i];
    float d = load(dout + j);
    sw += norm * d;
    sb += d;
  }
  long long r = blockIdx.y, P = gridDim.y;
  partial[r * C + c] = sw;
  partial[(P + r) * C + c] = sb;
}

extern "C" __global__ void layernorm_backward_dwdb_partial(float* partial, const float* dout,
                                                           const float* inp, const float* mean,
                                                           const float* rstd, int N, int C) {
  layernorm_backward_dwdb_partial_impl(partial, dout, inp, mean, rstd, N, C);
}

extern "C" __global__ void layernorm_backward_dwdb_partial_bf16(float* partial, const bf16* dout,
                                                                const bf16* inp, const float* mean,
                                                                const float* rstd, int N, int C) {
  layernorm_backward_dwdb_partial_impl(partial, dout, inp, mean, rstd, N, C);
}

// Stage 2, grid_1d(32 * 2C): warp w < C writes dw[w], warp C + c writes db[c], each the sum of
// its column's P partials (column_sum_of_parts). Float32 partials: no bf16 twin.
extern "C" __global__ void layernorm_backward_dwdb_sum(float* dw, float* db, const float* partial,
                                                       int P, int C) {
  int w = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  bool is_db = w >= C;
  int c = is_db ? w - C : w;  // w >= 2C (the last block's spare warps): c >= C, adds nothing
  float s = column_sum_of_parts(partial + (is_db ? (long long)P * C : 0LL), P, C, c);
  if ((threadIdx.x & 31) == 0 && c < C) (is_db ? db : dw)[c] = s;
}

// Fused residual + LayerNorm (the pre-norm block's `x = x + f(x); h = ln(x)`): res_out = a + b
// (stored in the activation type, rounded once), then ln_out, mean, rstd = layernorm_forward of
// the stored res_out row. Bit for bit residual_forward followed by layernorm_forward, in one
// launch that reads a, b once: every thread writes the res_out elements c = threadIdx.x +
// k*blockDim.x and the layernorm body reads exactly those same elements back (its loops stride
// the same way), so no thread reads what another wrote and no barrier is needed between the
// phases; the read-back sees the rounded value. res_out may alias a or b (each element is read
// before it is written, by the same thread). grid_rows(N): one block per row.
template <class A>
__device__ void residual_layernorm_forward_impl(A* res_out, A* ln_out, float* mean, float* rstd,
                                                const A* a, const A* b, const A* w,
                                                const A* bias, int N, int C, float eps) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  long long row = (long long)i * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    store(res_out + row + c, load(a + row + c) + load(b + row + c));
  layernorm_forward_impl(ln_out, mean, rstd, res_out, w, bias, N, C, eps);
}

extern "C" __global__ void residual_layernorm_forward(float* res_out, float* ln_out, float* mean,
                                                      float* rstd, const float* a, const float* b,
                                                      const float* w, const float* bias, int N,
                                                      int C, float eps) {
  residual_layernorm_forward_impl(res_out, ln_out, mean, rstd, a, b, w, bias, N, C, eps);
}

extern "C" __global__ void residual_layernorm_forward_bf16(bf16* res_out, bf16* ln_out,
                                                           float* mean, float* rstd, const bf16* a,
                                                           const bf16* b, const bf16* w,
                                                           const bf16* bias, int N, int C,
                                                           float eps) {
  residual_layernorm_forward_impl(res_out, ln_out, mean, rstd, a, b, w, bias, N, C, eps);
}
