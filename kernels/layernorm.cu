// LayerNorm over the last axis of inp[N,C]. Row kernels run one block per row; any blockDim.x
// that is a multiple of 32 (up to 1024) works, and the reduction order is fixed by it.

#include "block_reduce.cuh"

// out = (x - mean) * rstd * w + b with mean, var (two-pass) over the row, rstd = 1/sqrt(var+eps);
// saves mean[i], rstd[i]. grid_rows(N): one block per row.
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd,
                                             const float* inp, const float* w, const float* b,
                                             int N, int C, float eps) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const float* x = inp + (long long)i * C;
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s += x[c];
  float m = block_sum(s) / C;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (x[c] - m) * (x[c] - m);
  float r = 1.0f / sqrtf(block_sum(ss) / C + eps);
  float* y = out + (long long)i * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) y[c] = (x[c] - m) * r * w[c] + b[c];
  if (threadIdx.x == 0) {
    mean[i] = m;
    rstd[i] = r;
  }
}

// dnorm = w*dout, norm = (x-mean)*rstd:
// dinp[i,c] += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm*norm)) (accumulated).
// grid_rows(N): one block per row.
extern "C" __global__ void layernorm_backward_dinp(float* dinp, const float* dout,
                                                   const float* inp, const float* w,
                                                   const float* mean, const float* rstd, int N,
                                                   int C) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  long long row = (long long)i * C;
  float m = mean[i], r = rstd[i];
  float s1 = 0.0f, s2 = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float dnorm = w[c] * dout[row + c];
    s1 += dnorm;
    s2 += dnorm * (inp[row + c] - m) * r;
  }
  float dnorm_mean = block_sum(s1) / C;
  float dnorm_norm_mean = block_sum(s2) / C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float norm = (inp[row + c] - m) * r;
    float dnorm = w[c] * dout[row + c];
    dinp[row + c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
  }
}

// dw[c] = sum_i norm[i,c]*dout[i,c], db[c] = sum_i dout[i,c], rows i = 0..N-1 in order
// (written). grid_1d(C): one thread per column.
extern "C" __global__ void layernorm_backward_dwdb(float* dw, float* db, const float* dout,
                                                   const float* inp, const float* mean,
                                                   const float* rstd, int N, int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int i = 0; i < N; ++i) {
    long long j = (long long)i * C + c;
    float norm = (inp[j] - mean[i]) * rstd[i];
    sw += norm * dout[j];
    sb += dout[j];
  }
  dw[c] = sw;
  db[c] = sb;
}
