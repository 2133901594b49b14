// Causal self-attention around cuBLAS: layout changes between qkv[B,T,(NH+2KV)hs] (q heads at
// channel 0, k heads at NH*hs, v heads at (NH+KV)*hs, head h at h*hs; GPT-2: KV = NH) and
// per-head [B,NH,T,hs] (q, y) or [B,KV,T,hs] (k, v), and the causal softmax over rows of
// att[B*NH*T, T]. Grouped-query attention (KV < NH, g = NH/KV): query head h reads kv head h/g;
// k and v are never copied per query head (the products run on [B,KV,g*T,hs] views of q), and the
// gradients of a kv head are the sum of its g query heads' in ascending h. Softmax kernels run
// one block per row; any blockDim.x that is a multiple of 32 (up to 1024) works, and the
// reduction order is fixed by it.
// Bodies are templates over the element type (float, or bf16: the layout kernels copy its bits,
// the group sums and the softmax kernels widen through load/store and do all math in float).

#include "bf16.cuh"
#include "block_reduce.cuh"

// Offset of element j = [b,h,t,i] of a [B,NH,T,hs] tensor in a [B,T,width] tensor holding head
// h at channels h*hs+i (width NH*hs for y and dout, (NH+2KV)*hs for qkv).
__device__ long long head_offset(long long j, int T, int NH, int hs, long long width) {
  long long i = j % hs, t = j / hs % T, h = j / ((long long)hs * T) % NH;
  long long b = j / ((long long)hs * T * NH);
  return (b * T + t) * width + h * hs + i;
}

// Index in a [B,KV,T,hs] tensor of element j = [b,h,t,i] of a [B,NH,T,hs] one with h < KV
// (j itself when KV = NH).
__device__ long long kv_index(long long j, int T, int NH, int KV, int hs) {
  long long per_head = (long long)T * hs, b = j / (per_head * NH);
  return j - b * per_head * (NH - KV);
}

// q[b,h,t,i] = qkv[b,t,h*hs+i]; for h < KV also k[b,h,t,i] = qkv[b,t,NH*hs+h*hs+i] and
// v[b,h,t,i] = qkv[b,t,(NH+KV)*hs+h*hs+i] (k, v: [B,KV,T,hs]); grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_permute_impl(E* q, E* k, E* v, const E* qkv, int B, int T, int NH,
                                       int KV, int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  long long Cq = (long long)NH * hs, Ckv = (long long)KV * hs;
  long long src = head_offset(j, T, NH, hs, Cq + 2 * Ckv);
  q[j] = qkv[src];
  if (j / ((long long)hs * T) % NH < KV) {
    long long o = kv_index(j, T, NH, KV, hs);
    k[o] = qkv[src + Cq];
    v[o] = qkv[src + Cq + Ckv];
  }
}

extern "C" __global__ void attention_permute(float* q, float* k, float* v, const float* qkv,
                                             int B, int T, int NH, int KV, int hs) {
  attention_permute_impl(q, k, v, qkv, B, T, NH, KV, hs);
}

extern "C" __global__ void attention_permute_bf16(bf16* q, bf16* k, bf16* v, const bf16* qkv,
                                                  int B, int T, int NH, int KV, int hs) {
  attention_permute_impl(q, k, v, qkv, B, T, NH, KV, hs);
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

// dqkv[b,t,h*hs+i] = dq[b,h,t,i] and, for kv head h < KV, dqkv[b,t,NH*hs+h*hs+i] = the sum of
// dk[b,h',t,i] over its query heads h' = h*g .. h*g+g-1 in ascending order, likewise
// dqkv[b,t,(NH+KV)*hs+h*hs+i] from dv (dq, dk, dv: per query head [B,NH,T,hs]; the adjoint of
// attention_permute, written; g = 1: the values themselves, bit for bit). grid_1d(B*NH*T*hs).
template <class E>
__device__ void attention_permute_backward_impl(E* dqkv, const E* dq, const E* dk, const E* dv,
                                                int B, int T, int NH, int KV, int hs) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * NH * T * hs) return;
  long long Cq = (long long)NH * hs, Ckv = (long long)KV * hs, per_head = (long long)T * hs;
  long long dst = head_offset(j, T, NH, hs, Cq + 2 * Ckv);
  dqkv[dst] = dq[j];
  long long h = j / per_head % NH;
  if (h < KV) {
    int g = NH / KV;
    long long first = j + (h * (g - 1)) * per_head;  // [b, h*g, t, i]
    float sk = load(dk + first), sv = load(dv + first);
    for (int m = 1; m < g; ++m) {
      sk += load(dk + first + m * per_head);
      sv += load(dv + first + m * per_head);
    }
    store(dqkv + dst + Cq, sk);
    store(dqkv + dst + Cq + Ckv, sv);
  }
}

extern "C" __global__ void attention_permute_backward(float* dqkv, const float* dq,
                                                      const float* dk, const float* dv, int B,
                                                      int T, int NH, int KV, int hs) {
  attention_permute_backward_impl(dqkv, dq, dk, dv, B, T, NH, KV, hs);
}

extern "C" __global__ void attention_permute_backward_bf16(bf16* dqkv, const bf16* dq,
                                                           const bf16* dk, const bf16* dv, int B,
                                                           int T, int NH, int KV, int hs) {
  attention_permute_backward_impl(dqkv, dq, dk, dv, B, T, NH, KV, hs);
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
