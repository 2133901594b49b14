// Causal self-attention around cuBLAS: layout changes between qkv[B,T,3C] (q at channel 0, k at
// C, v at 2C, head h at h*hs, C = NH*hs) and per-head [B,NH,T,hs], and the causal softmax over
// rows of att[B*NH*T, T]. Softmax kernels run one block per row; any blockDim.x that is a
// multiple of 32 (up to 1024) works, and the reduction order is fixed by it.
// Bodies are templates over the element type (float, or bf16: the layout kernels copy its bits,
// the softmax kernels widen through load/store and do all math in float).

#include "bf16.cuh"
#include "block_reduce.cuh"

// Offset of element j = [b,h,t,i] of a [B,NH,T,hs] tensor in a [B,T,width] tensor holding head
// h at channels h*hs+i (width C = NH*hs for y and dout, 3C for qkv).
__device__ long long head_offset(long long j, int T, int NH, int hs, long long width) {
  long long i = j % hs, t = j / hs % T, h = j / ((long long)hs * T) % NH;
  long long b = j / ((long long)hs * T * NH);
  return (b * T + t) * width + h * hs + i;
}

// q[b,h,t,i] = qkv[b,t,h*hs+i], k[b,h,t,i] = qkv[b,t,C+h*hs+i], v[...] = qkv[b,t,2C+h*hs+i];
// grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_permute_impl(E* q, E* k, E* v, const E* qkv, int B, int T, int NH,
                                       int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  long long C = (long long)NH * hs, src = head_offset(j, T, NH, hs, 3 * C);
  q[j] = qkv[src];
  k[j] = qkv[src + C];
  v[j] = qkv[src + 2 * C];
}

extern "C" __global__ void attention_permute(float* q, float* k, float* v, const float* qkv,
                                             int B, int T, int NH, int hs) {
  attention_permute_impl(q, k, v, qkv, B, T, NH, hs);
}

extern "C" __global__ void attention_permute_bf16(bf16* q, bf16* k, bf16* v, const bf16* qkv,
                                                  int B, int T, int NH, int hs) {
  attention_permute_impl(q, k, v, qkv, B, T, NH, hs);
}

// out[b,t,h*hs+i] = y[b,h,t,i]; grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_unpermute_impl(E* out, const E* y, int B, int T, int NH, int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  out[head_offset(j, T, NH, hs, (long long)NH * hs)] = y[j];
}

extern "C" __global__ void attention_unpermute(float* out, const float* y, int B, int T, int NH,
                                               int hs) {
  attention_unpermute_impl(out, y, B, T, NH, hs);
}

extern "C" __global__ void attention_unpermute_bf16(bf16* out, const bf16* y, int B, int T,
                                                    int NH, int hs) {
  attention_unpermute_impl(out, y, B, T, NH, hs);
}

// dy[b,h,t,i] = dout[b,t,h*hs+i] (the adjoint of attention_unpermute); grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_unpermute_backward_impl(E* dy, const E* dout, int B, int T, int NH,
                                                  int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  dy[j] = dout[head_offset(j, T, NH, hs, (long long)NH * hs)];
}

extern "C" __global__ void attention_unpermute_backward(float* dy, const float* dout, int B,
                                                        int T, int NH, int hs) {
  attention_unpermute_backward_impl(dy, dout, B, T, NH, hs);
}

extern "C" __global__ void attention_unpermute_backward_bf16(bf16* dy, const bf16* dout, int B,
                                                             int T, int NH, int hs) {
  attention_unpermute_backward_impl(dy, dout, B, T, NH, hs);
}

// dqkv[b,t,h*hs+i] = dq[b,h,t,i], dqkv[b,t,C+h*hs+i] = dk[...], dqkv[b,t,2C+h*hs+i] = dv[...]
// (the adjoint of attention_permute, written); grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_permute_backward_impl(E* dqkv, const E* dq, const E* dk, const E* dv,
                                                int B, int T, int NH, int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  long long C = (long long)NH * hs, dst = head_offset(j, T, NH, hs, 3 * C);
  dqkv[dst] = dq[j];
  dqkv[dst + C] = dk[j];
  dqkv[dst + 2 * C] = dv[j];
}

extern "C" __global__ void attention_permute_backward(float* dqkv, const float* dq,
                                                      const float* dk, const float* dv, int B,
                                                      int T, int NH, int hs) {
  attention_permute_backward_impl(dqkv, dq, dk, dv, B, T, NH, hs);
}

extern "C" __global__ void attention_permute_backward_bf16(bf16* dqkv, const bf16* dq,
                                                           const bf16* dk, const bf16* dv, int B,
                                                           int T, int NH, int hs) {
  attention_permute_backward_impl(dqkv, dq, dk, dv, B, T, NH, hs);
}

// Row r of [BNH*T, T], t = r % T: att[r,t2] = exp(s[t2] - max) / sum_{j<=t} exp(s[j] - max)
// with s = scale*preatt[r,:], for t2 <= t; 0 for t2 > t. grid_rows(BNH*T): one block per row.
// att may alias preatt: each element is read and then written by the same thread.
template <class A>
__device__ void softmax_causal_forward_impl(A* att, const A* preatt, int BNH, int T,
                                            float scale) {
  long long r = blockIdx.x;
  if (r >= (long long)BNH * T) return;  // uniform: the whole block leaves
  int t = (int)(r % T);
  const A* x = preatt + r * T;
  float m = -3.402823466e+38f;
  for (int t2 = threadIdx.x; t2 <= t; t2 += blockDim.x) m = fmaxf(m, scale * load(x + t2));
  m = block_max(m);
  float s = 0.0f;
  for (int t2 = threadIdx.x; t2 <= t; t2 += blockDim.x) s += expf(scale * load(x + t2) - m);
  float inv = 1.0f / block_sum(s);
  A* y = att + r * T;
  for (int t2 = threadIdx.x; t2 < T; t2 += blockDim.x)
    store(y + t2, t2 <= t ? expf(scale * load(x + t2) - m) * inv : 0.0f);
}

extern "C" __global__ void softmax_causal_forward(float* att, const float* preatt, int BNH, int T,
                                                  float scale) {
  softmax_causal_forward_impl(att, preatt, BNH, T, scale);
}

extern "C" __global__ void softmax_causal_forward_bf16(bf16* att, const bf16* preatt, int BNH,
                                                       int T, float scale) {
  softmax_causal_forward_impl(att, preatt, BNH, T, scale);
}

// Row r, t = r % T: for t2 <= t,
// dpreatt[r,t2] = scale * att[r,t2] * (datt[r,t2] - sum_{j<=t} att[r,j]*datt[r,j]); 0 for t2 > t.
// grid_rows(BNH*T): one block per row. dpreatt may alias datt.
template <class A>
__device__ void softmax_causal_backward_impl(A* dpreatt, const A* datt, const A* att, int BNH,
                                             int T, float scale) {
  long long r = blockIdx.x;
  if (r >= (long long)BNH * T) return;  // uniform: the whole block leaves
  int t = (int)(r % T);
  const A* a = att + r * T;
  const A* da = datt + r * T;
  float s = 0.0f;
  for (int t2 = threadIdx.x; t2 <= t; t2 += blockDim.x) s += load(a + t2) * load(da + t2);
  float dot = block_sum(s);
  A* dp = dpreatt + r * T;
  for (int t2 = threadIdx.x; t2 < T; t2 += blockDim.x)
    store(dp + t2, t2 <= t ? scale * load(a + t2) * (load(da + t2) - dot) : 0.0f);
}

extern "C" __global__ void softmax_causal_backward(float* dpreatt, const float* datt,
                                                   const float* att, int BNH, int T,
                                                   float scale) {
  softmax_causal_backward_impl(dpreatt, datt, att, BNH, T, scale);
}

extern "C" __global__ void softmax_causal_backward_bf16(bf16* dpreatt, const bf16* datt,
                                                        const bf16* att, int BNH, int T,
                                                        float scale) {
  softmax_causal_backward_impl(dpreatt, datt, att, BNH, T, scale);
}
