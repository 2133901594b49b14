// AdamW (PyTorch's decoupled weight decay) over a flat float32 parameter buffer, in double.

// For i < n, (start, end, decay) the row of ranges[n_ranges,3] with start <= i < end:
// g = grads[i]*grad_scale; m = beta1 m + (1-beta1) g; v = beta2 v + (1-beta2) g^2;
// params[i] = params[i]*(decay ? 1 - lr*weight_decay : 1) - (lr/bc1) m / (sqrt(v)/bc2_sqrt + eps),
// bc1 = 1 - beta1^t and bc2_sqrt = sqrt(1 - beta2^t) from the host. grid_1d(n).
extern "C" __global__ void adamw_update(float* params, const float* grads, float* m, float* v,
                                        const long long* ranges, int n_ranges, long long n,
                                        double lr, double beta1, double beta2, double eps,
                                        double weight_decay, double bc1, double bc2_sqrt,
                                        double grad_scale) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int lo = 0, hi = n_ranges - 1;  // the last row whose start is <= i (rows are in order)
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (ranges[3 * mid] <= i) lo = mid; else hi = mid - 1;
  }
  double decay = ranges[3 * lo + 2] != 0 ? 1.0 - lr * weight_decay : 1.0;
  double g = grads[i] * grad_scale;
  double mi = beta1 * m[i] + (1.0 - beta1) * g;
  double vi = beta2 * v[i] + (1.0 - beta2) * g * g;
  m[i] = (float)mi;
  v[i] = (float)vi;
  params[i] = (float)(params[i] * decay - (lr / bc1) * mi / (sqrt(vi) / bc2_sqrt + eps));
}
