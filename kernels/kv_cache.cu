// Inference with a KV cache (crystal.generate, crystal/backends/cuda_infer.py): the embedding at
// each sequence's own position, the store of new keys and values into the cache, attention of
// the new queries against the cache, and the gather of one row per sequence for the LM head.
// Cache layout: k, v [B, NH, cap, hs] per layer; pos[b]: the position of sequence b's first
// new token (its earlier positions are cached). Each kernel body is a template over the
// activation type A (float, or bf16 through load/store with float math); scores are float32.
// pos[b] = -1: sequence b sits out this step (embedded at position 0, nothing stored in its
// cache, attention output 0), so a finished sequence's cache stays as it was.

#include "bf16.cuh"
#include "block_reduce.cuh"

// out[b,t,c] = wte[idx[b,t],c] + wpe[pos[b]+t,c] for i = b*T+t < BT; grid_1d(BT*C).
template <class A>
__device__ void embed_at_impl(A* out, const int* idx, const A* wte, const A* wpe, const int* pos,
                              int BT, int T, int C) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)BT * C) return;
  long long i = j / C;
  int c = (int)(j % C);
  long long p = (long long)(pos[i / T] < 0 ? 0 : pos[i / T]) + i % T;
  store(out + j, load(wte + (long long)idx[i] * C + c) + load(wpe + p * C + c));
}

extern "C" __global__ void embed_at(float* out, const int* idx, const float* wte,
                                    const float* wpe, const int* pos, int BT, int T, int C) {
  embed_at_impl(out, idx, wte, wpe, pos, BT, T, C);
}

extern "C" __global__ void embed_at_bf16(bf16* out, const int* idx, const bf16* wte,
                                         const bf16* wpe, const int* pos, int BT, int T, int C) {
  embed_at_impl(out, idx, wte, wpe, pos, BT, T, C);
}

// k[b,h,pos[b]+t,d] = qkv[b,t,C+h*hs+d], v likewise from qkv[b,t,2C+h*hs+d]; grid_1d(B*T*C)
// with C = NH*hs. Bits copied.
template <class A>
__device__ void kv_store_impl(A* k, A* v, const A* qkv, const int* pos, int B, int T, int NH,
                              int hs, int cap) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  int C = NH * hs;
  if (j >= (long long)B * T * C) return;
  long long i = j / C;  // the token: b*T + t
  int c = (int)(j % C), b = (int)(i / T), t = (int)(i % T), h = c / hs, d = c % hs;
  if (pos[b] < 0) return;
  long long dst = (((long long)b * NH + h) * cap + pos[b] + t) * hs + d;
  k[dst] = qkv[i * 3 * C + C + c];
  v[dst] = qkv[i * 3 * C + 2 * C + c];
}

extern "C" __global__ void kv_store(float* k, float* v, const float* qkv, const int* pos, int B,
                                    int T, int NH, int hs, int cap) {
  kv_store_impl(k, v, qkv, pos, B, T, NH, hs, cap);
}

extern "C" __global__ void kv_store_bf16(bf16* k, bf16* v, const bf16* qkv, const int* pos, int B,
                                         int T, int NH, int hs, int cap) {
  kv_store_impl(k, v, qkv, pos, B, T, NH, hs, cap);
}

// Query row r = (b*NH + h)*T + t at position p = pos[b] + t attends to the cached keys 0..p:
// s = scale * (q . k_j) (float32, into scores[r*cap + j]), probabilities exp(s - max) / sum,
// out[b,t,h*hs+d] = sum_j prob_j v[j,d] (j in order). The cache must hold the new keys already
// (kv_store). grid_rows(B*NH*T): one block per query row.
template <class A>
__device__ void kv_attention_impl(A* out, const A* qkv, const A* k, const A* v, float* scores,
                                  const int* pos, int B, int T, int NH, int hs, int cap,
                                  float scale) {
  long long r = blockIdx.x;
  if (r >= (long long)B * NH * T) return;  // uniform: the whole block leaves
  int t = (int)(r % T), h = (int)((r / T) % NH), b = (int)(r / ((long long)T * NH));
  int C = NH * hs, L = pos[b] + t + 1;
  if (pos[b] < 0) {  // uniform: the whole block writes zeros and leaves
    A* y = out + ((long long)b * T + t) * C + h * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) store(y + d, 0.0f);
    return;
  }
  const A* q = qkv + ((long long)b * T + t) * 3 * C + h * hs;
  const A* kh = k + ((long long)b * NH + h) * cap * hs;
  const A* vh = v + ((long long)b * NH + h) * cap * hs;
  float* s = scores + r * cap;
  float m = -3.402823466e+38f;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    float dot = 0.0f;
    for (int d = 0; d < hs; ++d) dot += load(q + d) * load(kh + (long long)j * hs + d);
    s[j] = scale * dot;
    m = fmaxf(m, s[j]);
  }
  m = block_max(m);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    float e = expf(s[j] - m);
    s[j] = e;
    sum += e;
  }
  float inv = 1.0f / block_sum(sum);  // its barrier orders every s[j] before the reads below
  A* y = out + ((long long)b * T + t) * C + h * hs;
  for (int d = threadIdx.x; d < hs; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < L; ++j) acc += s[j] * load(vh + (long long)j * hs + d);
    store(y + d, acc * inv);
  }
}

extern "C" __global__ void kv_attention(float* out, const float* qkv, const float* k,
                                        const float* v, float* scores, const int* pos, int B,
                                        int T, int NH, int hs, int cap, float scale) {
  kv_attention_impl(out, qkv, k, v, scores, pos, B, T, NH, hs, cap, scale);
}

extern "C" __global__ void kv_attention_bf16(bf16* out, const bf16* qkv, const bf16* k,
                                             const bf16* v, float* scores, const int* pos, int B,
                                             int T, int NH, int hs, int cap, float scale) {
  kv_attention_impl(out, qkv, k, v, scores, pos, B, T, NH, hs, cap, scale);
}

// out[b,c] = x[b,rows[b],c] for x [B,T,C]; grid_1d(B*C). Bits copied.
template <class A>
__device__ void gather_rows_impl(A* out, const A* x, const int* rows, int B, int T, int C) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * C) return;
  long long b = j / C;
  out[j] = x[(b * T + rows[b]) * C + j % C];
}

extern "C" __global__ void gather_rows(float* out, const float* x, const int* rows, int B, int T,
                                       int C) {
  gather_rows_impl(out, x, rows, B, T, C);
}

extern "C" __global__ void gather_rows_bf16(bf16* out, const bf16* x, const int* rows, int B,
                                            int T, int C) {
  gather_rows_impl(out, x, rows, B, T, C);
}
