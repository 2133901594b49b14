// Block-wide reductions shared by the row kernels (layernorm, attention softmax, cross-entropy,
// norm). Every thread of the block must call them (they hold __syncthreads and warp shuffles);
// the order is fixed by blockDim.x alone: xor-shuffles inside each warp (all lanes end with the
// same bits), then the same over the per-warp partials.
#ifndef CRYSTAL_BLOCK_REDUCE_CUH
#define CRYSTAL_BLOCK_REDUCE_CUH

// Sum of v over the block, returned to every thread.
template <class T> __device__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call may still be reading warp_sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : T(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Maximum of v over the block, returned to every thread.
__device__ inline float block_max(float v) {
  __shared__ float warp_maxes[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_maxes[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? warp_maxes[lane] : -3.402823466e+38f;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// (m, s) of two parts of a softmax row, each s = sum exp(x - m) over its part, combined as
// (M, s1 exp(m1 - M) + s2 exp(m2 - M)) with M = max(m1, m2). Rounded products and sum (no fused
// multiply-add), so combine(p, q) and combine(q, p) have the same bits: all lanes of a
// xor-shuffle agree. An empty part is (-FLT_MAX, 0).
__device__ inline void max_sum_combine(float& m, float& s, float m2, float s2) {
  float M = fmaxf(m, m2);
  s = __fadd_rn(__fmul_rn(s, expf(m - M)), __fmul_rn(s2, expf(m2 - M)));
  m = M;
}

// The online softmax statistics of the block: each thread holds (m, s) of its elements (see
// max_sum_combine); on return every thread holds the whole block's, combined in the fixed order
// of block_sum (xor-shuffles inside each warp, then over the per-warp partials).
__device__ inline void block_max_sum(float& m, float& s) {
  __shared__ float warp_m[32], warp_s[32];
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    max_sum_combine(m, s, m2, s2);
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call may still be reading warp_m, warp_s
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  bool has = lane < (int)(blockDim.x >> 5);
  m = has ? warp_m[lane] : -3.402823466e+38f;
  s = has ? warp_s[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    max_sum_combine(m, s, m2, s2);
  }
}

#endif
