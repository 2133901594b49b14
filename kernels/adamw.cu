// AdamW (PyTorch's decoupled weight decay) over a flat float32 parameter buffer, in float32 as
// PyTorch computes it, from per-step scalars rounded once (crystal.backends.base.AdamWScalars),
// read from device memory s[ADAMW_SCALARS]: b1, b2, 1-b1, 1-b2, step_size, inv_bc2_sqrt, eps,
// decay, grad_scale (the AdamWScalars fields, in order), then skip: nonzero leaves every array
// as it is (a step with a non-finite loss or gradient norm, decided on the device by
// step_scalars in norm.cu when the step runs as a CUDA graph).

#include "bf16.cuh"

// For i < n, (start, end, decay?) the row of ranges[n_ranges,3] with start <= i < end:
// g = grads[i]*grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// params[i] = params[i]*(decay? ? decay : 1) - step_size m / (sqrt(v) inv_bc2_sqrt + eps).
// Products and sums are rounded one at a time (__fmul_rn/__fadd_rn: no fused multiply-add), so
// the result is the cpu backend's bit for bit. Stores m[i], v[i], then reads params[i] and
// returns its new value (the caller stores it).
__device__ inline float adamw_step(long long i, const float* params, const float* grads,
                                   float* m, float* v, const long long* ranges, int n_ranges,
                                   const float* s) {
  float b1 = s[0], b2 = s[1], ob1 = s[2], ob2 = s[3], step_size = s[4], inv_bc2_sqrt = s[5];
  float eps = s[6], decay = s[7], grad_scale = s[8];
  int lo = 0, hi = n_ranges - 1;  // the last row whose start is <= i (rows are in order)
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (ranges[3 * mid] <= i) lo = mid; else hi = mid - 1;
  }
  float d = ranges[3 * lo + 2] != 0 ? decay : 1.0f;
  float g = __fmul_rn(grads[i], grad_scale);
  float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(ob1, g));
  float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(ob2, g), g));
  m[i] = mi;
  v[i] = vi;
  float denom = __fadd_rn(__fmul_rn(sqrtf(vi), inv_bc2_sqrt), eps);
  return __fsub_rn(__fmul_rn(params[i], d), __fdiv_rn(__fmul_rn(step_size, mi), denom));
}

// The update above in place on params; grid_1d(n).
extern "C" __global__ void adamw_update(float* params, const float* grads, float* m, float* v,
                                        const long long* ranges, int n_ranges, long long n,
                                        const float* s) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || s[9] != 0.0f) return;
  params[i] = adamw_step(i, params, grads, m, v, ranges, n_ranges, s);
}

// adamw_update (the same params, m, v, bit for bit) that also writes the bf16 weight copy,
// params_bf16[i] = bf16(new params[i]) rounded to nearest even (NaN -> 0x7FFF), as cast_to_bf16
// would after it: the optimizer step of --precision bf16 in one pass. grid_1d(n).
extern "C" __global__ void adamw_update_copy_bf16(float* params, bf16* params_bf16,
                                                  const float* grads, float* m, float* v,
                                                  const long long* ranges, int n_ranges,
                                                  long long n, const float* s) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || s[9] != 0.0f) return;
  float p = adamw_step(i, params, grads, m, v, ranges, n_ranges, s);
  params[i] = p;
  params_bf16[i] = f32_to_bf16(p);
}
