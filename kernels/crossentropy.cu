// Fused softmax + cross-entropy over logits[N,V]. The forward runs one block per row; any
// blockDim.x that is a multiple of 32 (up to 1024) works, and the reduction order is fixed by it.

#include "block_reduce.cuh"

// lse = max + log(sum_v exp(logits[i,v] - max)); losses[i] = lse - logits[i,targets[i]];
// probs[i,v] = exp(logits[i,v] - lse). grid_rows(N): one block per row. probs may alias logits:
// every read of a logit happens before the block's first write (block_sum synchronizes).
extern "C" __global__ void crossentropy_forward(float* losses, float* probs, const float* logits,
                                                const int* targets, int N, int V) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const float* x = logits + (long long)i * V;
  float target_logit = x[targets[i]];
  float m = -3.402823466e+38f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, x[v]);
  m = block_max(m);
  float s = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(x[v] - m);
  float lse = m + logf(block_sum(s));
  if (threadIdx.x == 0) losses[i] = lse - target_logit;
  float* p = probs + (long long)i * V;
  for (int v = threadIdx.x; v < V; v += blockDim.x) p[v] = expf(x[v] - lse);
}

// dlogits[i,v] = probs[i,v]*dloss - (v == targets[i] ? dloss : 0); grid_1d(N*V).
// dlogits may alias probs.
extern "C" __global__ void crossentropy_backward(float* dlogits, const float* probs,
                                                 const int* targets, int N, int V, float dloss) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * V) return;
  float d = probs[j] * dloss;
  dlogits[j] = j % V == targets[j / V] ? d - dloss : d;
}
