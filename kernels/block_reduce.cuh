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

#endif
