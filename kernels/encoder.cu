// Token + position embedding and its gradients. Flat indices are 64-bit; sizes are i32.
// Each kernel body is a template over the activation type A (float, or bf16 read and written
// through load/store, math in float); the fp32 and _bf16 kernels instantiate it. Gradients of
// the embeddings (dwte, dwpe) are float32 in both.

#include "bf16.cuh"

// out[i,c] = wte[idx[i],c] + wpe[i%T,c] for rows i < BT; wpe NULL (Llama: no position
// embeddings): out[i,c] = wte[idx[i],c], bits copied. grid_1d(BT*C).
template <class A>
__device__ void encoder_forward_impl(A* out, const int* idx, const A* wte, const A* wpe, int BT,
                                     int T, int C) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)BT * C) return;
  long long i = j / C;
  int c = (int)(j % C);
  const A* e = wte + (long long)idx[i] * C + c;
  if (wpe == nullptr) {
    out[j] = *e;
    return;
  }
  store(out + j, load(e) + load(wpe + (i % T) * C + c));
}

extern "C" __global__ void encoder_forward(float* out, const int* idx, const float* wte,
                                           const float* wpe, int BT, int T, int C) {
  encoder_forward_impl(out, idx, wte, wpe, BT, T, C);
}

extern "C" __global__ void encoder_forward_bf16(bf16* out, const int* idx, const bf16* wte,
                                                const bf16* wpe, int BT, int T, int C) {
  encoder_forward_impl(out, idx, wte, wpe, BT, T, C);
}

// dwpe[t,c] = sum_{b=0..B-1} dout[(b*T+t)*C+c] in order of b for t < T, 0 for T <= t < Tmax
// (written); grid_1d(Tmax*C).
template <class A>
__device__ void encoder_backward_wpe_impl(float* dwpe, const A* dout, int B, int T, int Tmax,
                                          int C) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)Tmax * C) return;
  long long t = j / C;
  float acc = 0.0f;
  if (t < T)
    for (int b = 0; b < B; ++b) acc += load(dout + ((long long)b * T + t) * C + j % C);
  dwpe[j] = acc;
}

extern "C" __global__ void encoder_backward_wpe(float* dwpe, const float* dout, int B, int T,
                                                int Tmax, int C) {
  encoder_backward_wpe_impl(dwpe, dout, B, T, Tmax, C);
}

extern "C" __global__ void encoder_backward_wpe_bf16(float* dwpe, const bf16* dout, int B, int T,
                                                     int Tmax, int C) {
  encoder_backward_wpe_impl(dwpe, dout, B, T, Tmax, C);
}

// dwte[tok_k,c] += dout[p,c] for the positions p of bucket k (token tok_k = bucket_token[k],
// positions[bucket_start[k] .. bucket_start[k+1]) ascending), added in that order: the cpu
// kernel's (b,t) order. Grid (cdiv(C,block), n_buckets, 1): blockIdx.y is the bucket.
template <class A>
__device__ void encoder_backward_wte_impl(float* dwte, const A* dout, const int* bucket_token,
                                          const int* bucket_start, const int* positions,
                                          int n_buckets, int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int k = blockIdx.y; k < n_buckets; k += gridDim.y) {  // any grid.y <= n_buckets works
    float* row = dwte + (long long)bucket_token[k] * C;
    float acc = row[c];
    for (int p = bucket_start[k]; p < bucket_start[k + 1]; ++p)
      acc += load(dout + (long long)positions[p] * C + c);
    row[c] = acc;
  }
}

extern "C" __global__ void encoder_backward_wte(float* dwte, const float* dout,
                                                const int* bucket_token, const int* bucket_start,
                                                const int* positions, int n_buckets, int C) {
  encoder_backward_wte_impl(dwte, dout, bucket_token, bucket_start, positions, n_buckets, C);
}

extern "C" __global__ void encoder_backward_wte_bf16(float* dwte, const bf16* dout,
                                                     const int* bucket_token,
                                                     const int* bucket_start, const int* positions,
                                                     int n_buckets, int C) {
  encoder_backward_wte_impl(dwte, dout, bucket_token, bucket_start, positions, n_buckets, C);
}
