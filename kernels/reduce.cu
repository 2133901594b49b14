// Flat-buffer ops of the gradient reducer.

// acc[i] += x[i]; grid_1d(n).
extern "C" __global__ void add_inplace(float* acc, const float* x, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc[i] += x[i];
}

// x[i] = (float)((double)x[i] * s); grid_1d(n).
extern "C" __global__ void scale_inplace(float* x, double s, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  x[i] = (float)((double)x[i] * s);
}
