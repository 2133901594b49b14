// Rotary position embeddings (Llama; Hugging Face's rotate-half layout), in place on the q and k
// heads of qkv[B, T, (NH + 2 KV) hd] = [q heads 0..NH-1 | k heads 0..KV-1 | v heads 0..KV-1]
// (v untouched). cos, sin: float32 [T, hd/2], row t = position t. Bodies are templates over the
// activation type A (float, or bf16 through load/store, math in float; cos and sin stay float32).

#include "bf16.cuh"

// One thread per pair (d, d + hd/2) of one q or k head at one position, j over
// [B, T, NH + KV, hd/2]; with x1 = x[d], x2 = x[d + hd/2], c = cos[t,d], s = sin[t,d]:
//   x[d] = x1 c - x2 s,  x[d + hd/2] = x2 c + x1 s.
// The backward is the transpose, the same rotation by -s (sign = -1: a - b == a + (-b) exactly).
// grid_1d(B*T*(NH+KV)*hd/2).
template <class A>
__device__ void rope_impl(A* qkv, const float* cos, const float* sin, int B, int T, int NH,
                          int KV, int hd, float sign) {
  int half = hd / 2, heads = NH + KV;
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)B * T * heads * half) return;
  int d = (int)(j % half);
  long long h = j / half % heads, bt = j / ((long long)half * heads), t = bt % T;
  A* x = qkv + bt * (heads + KV) * hd + h * hd;  // q heads, then the k heads right after them
  float c = cos[t * half + d], s = sign * sin[t * half + d];
  float x1 = load(x + d), x2 = load(x + d + half);
  store(x + d, x1 * c - x2 * s);
  store(x + d + half, x2 * c + x1 * s);
}

extern "C" __global__ void rope_forward(float* qkv, const float* cos, const float* sin, int B,
                                        int T, int NH, int KV, int hd) {
  rope_impl(qkv, cos, sin, B, T, NH, KV, hd, 1.0f);
}

extern "C" __global__ void rope_forward_bf16(bf16* qkv, const float* cos, const float* sin, int B,
                                             int T, int NH, int KV, int hd) {
  rope_impl(qkv, cos, sin, B, T, NH, KV, hd, 1.0f);
}

// dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s (in place on dqkv's q and k heads).
extern "C" __global__ void rope_backward(float* dqkv, const float* cos, const float* sin, int B,
                                         int T, int NH, int KV, int hd) {
  rope_impl(dqkv, cos, sin, B, T, NH, KV, hd, -1.0f);
}

extern "C" __global__ void rope_backward_bf16(bf16* dqkv, const float* cos, const float* sin,
                                              int B, int T, int NH, int KV, int hd) {
  rope_impl(dqkv, cos, sin, B, T, NH, KV, hd, -1.0f);
}
