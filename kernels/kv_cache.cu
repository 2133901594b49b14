// Inference with a KV cache (crystal.generate, crystal/backends/cuda_infer.py): the embedding at
// each sequence's own position, the rotary rotation at each sequence's own positions (llama),
// the store of new keys and values into the cache, attention of the new queries against the
// cache, and the gather of one row per sequence for the LM head.
// qkv rows: [q heads 0..NH-1 | k heads 0..KV-1 | v heads 0..KV-1], hd values each (GPT-2: KV =
// NH); query head h reads KV head h / (NH / KV) (grouped-query attention, in place).
// Cache layout: k, v [B, KV, cap, hd] per layer; pos[b]: the position of sequence b's first
// new token (its earlier positions are cached). Each kernel body is a template over the
// activation type A (float, or bf16 through load/store with float math); scores are float32.
// pos[b] = -1: sequence b sits out this step (embedded at position 0, not rotated, nothing
// stored in its cache, attention output 0), so a finished sequence's cache stays as it was.

#include "bf16.cuh"
#include "block_reduce.cuh"

// out[b,t,c] = wte[idx[b,t],c] + wpe[pos[b]+t,c] for i = b*T+t < BT; wpe NULL (llama: no
// position embeddings): out[b,t,c] = wte[idx[b,t],c], bits copied. grid_1d(BT*C).
template <class A>
__device__ void embed_at_impl(A* out, const int* idx, const A* wte, const A* wpe, const int* pos,
                              int BT, int T, int C) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)BT * C) return;
  long long i = j / C;
  int c = (int)(j % C);
  const A* e = wte + (long long)idx[i] * C + c;
  if (wpe == nullptr) {
    out[j] = *e;
    return;
  }
  long long p = (long long)(pos[i / T] < 0 ? 0 : pos[i / T]) + i % T;
  store(out + j, load(e) + load(wpe + p * C + c));
}

extern "C" __global__ void embed_at(float* out, const int* idx, const float* wte,
                                    const float* wpe, const int* pos, int BT, int T, int C) {
  embed_at_impl(out, idx, wte, wpe, pos, BT, T, C);
}

extern "C" __global__ void embed_at_bf16(bf16* out, const int* idx, const bf16* wte,
                                         const bf16* wpe, const int* pos, int BT, int T, int C) {
  embed_at_impl(out, idx, wte, wpe, pos, BT, T, C);
}

// Rotary embeddings at each sequence's positions (llama), in place on qkv[B, T, (NH + 2 KV) hd]:
// one thread per pair (d, d + hd/2) of one q or k head of one token, j over [B, T, NH + KV, hd/2];
// token (b, t) at position p = pos[b] + t, with x1 = x[d], x2 = x[d + hd/2], c = cos[p,d],
// s = sin[p,d]: x[d] = x1 c - x2 s, x[d + hd/2] = x2 c + x1 s (rope.cu's rotation, at position p
// instead of t). cos, sin: float32 [>= pos[b] + T, hd/2]. pos[b] = -1: untouched.
// grid_1d(B*T*(NH+KV)*hd/2).
template <class A>
__device__ void rope_at_impl(A* qkv, const float* cos, const float* sin, const int* pos, int B,
                             int T, int NH, int KV, int hd) {
  int half = hd / 2, heads = NH + KV;
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * T * heads * half) return;
  int d = (int)(j % half);
  long long h = j / half % heads, bt = j / ((long long)half * heads);
  int b = (int)(bt / T), t = (int)(bt % T);
  if (pos[b] < 0) return;
  long long p = (long long)pos[b] + t;
  A* x = qkv + bt * (heads + KV) * hd + h * hd;  // q heads, then the k heads right after them
  float c = cos[p * half + d], s = sin[p * half + d];
  float x1 = load(x + d), x2 = load(x + d + half);
  store(x + d, x1 * c - x2 * s);
  store(x + d + half, x2 * c + x1 * s);
}

extern "C" __global__ void rope_at(float* qkv, const float* cos, const float* sin, const int* pos,
                                   int B, int T, int NH, int KV, int hd) {
  rope_at_impl(qkv, cos, sin, pos, B, T, NH, KV, hd);
}

extern "C" __global__ void rope_at_bf16(bf16* qkv, const float* cos, const float* sin,
                                        const int* pos, int B, int T, int NH, int KV, int hd) {
  rope_at_impl(qkv, cos, sin, pos, B, T, NH, KV, hd);
}

// k[b,h,pos[b]+t,d] = k head h of token (b,t): qkv[b,t,(NH+h)*hd+d], v likewise from
// qkv[b,t,(NH+KV+h)*hd+d]; grid_1d(B*T*KV*hd). Bits copied.
template <class A>
__device__ void kv_store_impl(A* k, A* v, const A* qkv, const int* pos, int B, int T, int NH,
                              int KV, int hd, int cap) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  int W = KV * hd, R = (NH + 2 * KV) * hd;
  if (j >= (long long)B * T * W) return;
  long long i = j / W;  // the token: b*T + t
  int c = (int)(j % W), b = (int)(i / T), t = (int)(i % T), h = c / hd, d = c % hd;
  if (pos[b] < 0) return;
  long long dst = (((long long)b * KV + h) * cap + pos[b] + t) * hd + d;
  k[dst] = qkv[i * R + NH * hd + c];
  v[dst] = qkv[i * R + (NH + KV) * hd + c];
}

extern "C" __global__ void kv_store(float* k, float* v, const float* qkv, const int* pos, int B,
                                    int T, int NH, int KV, int hd, int cap) {
  kv_store_impl(k, v, qkv, pos, B, T, NH, KV, hd, cap);
}

extern "C" __global__ void kv_store_bf16(bf16* k, bf16* v, const bf16* qkv, const int* pos, int B,
                                         int T, int NH, int KV, int hd, int cap) {
  kv_store_impl(k, v, qkv, pos, B, T, NH, KV, hd, cap);
}

// Query row r = (b*NH + h)*T + t at position p = pos[b] + t attends to the cached keys 0..p of
// KV head h / (NH / KV): s = scale * (q . k_j) (float32, into scores[r*cap + j]), probabilities
// exp(s - max) / sum, out[b,t,h*hd+d] = sum_j prob_j v[j,d] (j in order). The cache must hold
// the new keys already (kv_store). grid_rows(B*NH*T): one block per query row.
template <class A>
__device__ void kv_attention_impl(A* out, const A* qkv, const A* k, const A* v, float* scores,
                                  const int* pos, int B, int T, int NH, int KV, int hd, int cap,
                                  float scale) {
  long long r = blockIdx.x;
  if (r >= (long long)B * NH * T) return;  // uniform: the whole block leaves
  int t = (int)(r % T), h = (int)((r / T) % NH), b = (int)(r / ((long long)T * NH));
  int Q = NH * hd, R = (NH + 2 * KV) * hd, L = pos[b] + t + 1, kh = h / (NH / KV);
  A* y = out + ((long long)b * T + t) * Q + h * hd;
  if (pos[b] < 0) {  // uniform: the whole block writes zeros and leaves
    for (int d = threadIdx.x; d < hd; d += blockDim.x) store(y + d, 0.0f);
    return;
  }
  const A* q = qkv + ((long long)b * T + t) * R + h * hd;
  const A* kc = k + ((long long)b * KV + kh) * cap * hd;
  const A* vc = v + ((long long)b * KV + kh) * cap * hd;
  float* s = scores + r * cap;
  float m = -3.402823466e+38f;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    float dot = 0.0f;
    for (int d = 0; d < hd; ++d) dot += load(q + d) * load(kc + (long long)j * hd + d);
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
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < L; ++j) acc += s[j] * load(vc + (long long)j * hd + d);
    store(y + d, acc * inv);
  }
}

extern "C" __global__ void kv_attention(float* out, const float* qkv, const float* k,
                                        const float* v, float* scores, const int* pos, int B,
                                        int T, int NH, int KV, int hd, int cap, float scale) {
  kv_attention_impl(out, qkv, k, v, scores, pos, B, T, NH, KV, hd, cap, scale);
}

extern "C" __global__ void kv_attention_bf16(bf16* out, const bf16* qkv, const bf16* k,
                                             const bf16* v, float* scores, const int* pos, int B,
                                             int T, int NH, int KV, int hd, int cap, float scale) {
  kv_attention_impl(out, qkv, k, v, scores, pos, B, T, NH, KV, hd, cap, scale);
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
