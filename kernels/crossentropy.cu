// Fused softmax + cross-entropy over logits[N,Vp] (rows Vp apart), whose first V columns are the
// vocabulary; columns V..Vp-1 are the LM head's padding (crystal.model.ParamLayout): never read,
// written 0 (probability 0, gradient 0), so the padded rows of dwte = dlogits^T inp are zero.
// The forward runs one block per row; any blockDim.x that is a multiple of 32 (up to 1024)
// works, and the reduction order is fixed by it. Bodies are templates over the activation type
// A of logits, probs and dlogits (float, or bf16 through load/store: softmax and loss in float,
// probs rounded once); losses are float32 in both. A target < 0 is ignored (a prompt token of
// instruction data, PyTorch's ignore_index): its loss is 0 and its dlogits row 0.

#include "bf16.cuh"
#include "block_reduce.cuh"

// lse = max + log(sum_v exp(logits[i,v] - max)); losses[i] = lse - logits[i,targets[i]] (0 for
// an ignored target); probs[i,v] = exp(logits[i,v] - lse), for every row. grid_rows(N): one
// block per row. probs may alias logits: every read of a logit happens before the block's first write (block_sum synchronizes), except
// in the last loop, where each thread reads a logit and then writes that same element.
template <class A>
__device__ void crossentropy_forward_impl(float* losses, A* probs, const A* logits,
                                          const int* targets, int N, int V, int Vp) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const A* x = logits + (long long)i * Vp;
  int target = targets[i];
  float target_logit = target >= 0 ? load(x + target) : 0.0f;
  float m = -3.402823466e+38f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, load(x + v));
  m = block_max(m);
  float s = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(load(x + v) - m);
  float lse = m + logf(block_sum(s));
  if (threadIdx.x == 0) losses[i] = target >= 0 ? lse - target_logit : 0.0f;
  A* p = probs + (long long)i * Vp;
  for (int v = threadIdx.x; v < Vp; v += blockDim.x)
    store(p + v, v < V ? expf(load(x + v) - lse) : 0.0f);
}

extern "C" __global__ void crossentropy_forward(float* losses, float* probs, const float* logits,
                                                const int* targets, int N, int V, int Vp) {
  crossentropy_forward_impl(losses, probs, logits, targets, N, V, Vp);
}

extern "C" __global__ void crossentropy_forward_bf16(float* losses, bf16* probs,
                                                     const bf16* logits, const int* targets,
                                                     int N, int V, int Vp) {
  crossentropy_forward_impl(losses, probs, logits, targets, N, V, Vp);
}

// dlogits[i,v] = probs[i,v]*dloss - (v == targets[i] ? dloss : 0) for v < V, 0 for the padding
// columns and for a row whose target is ignored (< 0); grid_1d(N*Vp). dlogits may alias probs.
template <class A>
__device__ void crossentropy_backward_impl(A* dlogits, const A* probs, const int* targets, int N,
                                           int V, int Vp, float dloss) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * Vp) return;
  int v = (int)(j % Vp);
  int target = targets[j / Vp];
  if (v >= V || target < 0) {
    store(dlogits + j, 0.0f);
    return;
  }
  float d = load(probs + j) * dloss;
  store(dlogits + j, v == target ? d - dloss : d);
}

extern "C" __global__ void crossentropy_backward(float* dlogits, const float* probs,
                                                 const int* targets, int N, int V, int Vp,
                                                 float dloss) {
  crossentropy_backward_impl(dlogits, probs, targets, N, V, Vp, dloss);
}

extern "C" __global__ void crossentropy_backward_bf16(bf16* dlogits, const bf16* probs,
                                                      const int* targets, int N, int V, int Vp,
                                                      float dloss) {
  crossentropy_backward_impl(dlogits, probs, targets, N, V, Vp, dloss);
}

// Forward and backward in one launch, two passes over the row (crossentropy_forward reads it
// three times and crossentropy_backward once more): losses[i] = lse - logits[i,targets[i]] and
// dlogits[i,v] = (softmax(logits)[i,v] - (v == targets[i])) * dloss, with lse = m + log(s) from
// the online statistics (m, s): each thread keeps the running max m of its logits and
// s = sum exp(x - m), rescaling s when the max grows (one expf per element), then block_max_sum
// combines the threads' (m, s) in a fixed order. The probabilities are never stored (in bf16
// they are not rounded before the gradient). dlogits may alias logits: the target logit is read
// before the block's first write (block_max_sum synchronizes), and in the last loop each thread
// reads a logit and then writes that same element. A row whose target is ignored (< 0) writes
// loss 0 and a zero dlogits row, reading nothing (the block leaves together). grid_rows(N): one
// block per row.
template <class A>
__device__ void crossentropy_forward_backward_impl(float* losses, A* dlogits, const A* logits,
                                                   const int* targets, int N, int V, int Vp,
                                                   float dloss) {
  int i = blockIdx.x;
  if (i >= N) return;  // uniform: the whole block leaves
  const A* x = logits + (long long)i * Vp;
  int target = targets[i];
  A* d = dlogits + (long long)i * Vp;
  if (target < 0) {  // uniform: every thread of the block reads the same target
    if (threadIdx.x == 0) losses[i] = 0.0f;
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) store(d + v, 0.0f);
    return;
  }
  float target_logit = load(x + target);
  float m = -3.402823466e+38f, s = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    float xv = load(x + v);
    if (xv > m) {
      s = s * expf(m - xv) + 1.0f;
      m = xv;
    } else {
      s += expf(xv - m);
    }
  }
  block_max_sum(m, s);
  float lse = m + logf(s);
  if (threadIdx.x == 0) losses[i] = lse - target_logit;
  for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
    if (v >= V) {  // the padding: gradient 0
      store(d + v, 0.0f);
      continue;
    }
    float g = expf(load(x + v) - lse) * dloss;
    store(d + v, v == target ? g - dloss : g);
  }
}

extern "C" __global__ void crossentropy_forward_backward(float* losses, float* dlogits,
                                                         const float* logits, const int* targets,
                                                         int N, int V, int Vp, float dloss) {
  crossentropy_forward_backward_impl(losses, dlogits, logits, targets, N, V, Vp, dloss);
}

extern "C" __global__ void crossentropy_forward_backward_bf16(float* losses, bf16* dlogits,
                                                              const bf16* logits,
                                                              const int* targets, int N, int V,
                                                              int Vp, float dloss) {
  crossentropy_forward_backward_impl(losses, dlogits, logits, targets, N, V, Vp, dloss);
}
