// Deterministic sums of a flat float32 buffer in double: exactly REDUCE_BLOCKS blocks
// (crystal/backends/kernels.py) each write one partial sum, then one block adds the partials.
// The result depends on REDUCE_BLOCKS and blockDim.x only, never on the device.

#include "block_reduce.cuh"

// partial[blockIdx.x] = sum of x[i]^2 (double) over i = blockIdx.x*blockDim.x + threadIdx.x
// + k*gridDim.x*blockDim.x; launched with exactly REDUCE_BLOCKS blocks.
extern "C" __global__ void sum_squares_partial(double* partial, const float* x, long long n) {
  double acc = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    double xi = x[i];
    acc += xi * xi;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial[blockIdx.x] = sum of x[i] (double) over the same grid-strided i as
// sum_squares_partial; launched with exactly REDUCE_BLOCKS blocks.
extern "C" __global__ void sum_partial(double* partial, const float* x, long long n) {
  double acc = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    acc += x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = sum of partial[0..n) in a fixed order; one block.
extern "C" __global__ void sum_doubles(double* out, const double* partial, int n) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

// The reducer's last step on a chunk in one pass: acc[i] = (float)((double)(acc[i] + x[i]) * s)
// (bit for bit add_inplace then scale_inplace: a float add, then the double product rounded to
// float), and partial[blockIdx.x] = sum of the new acc[i]^2 (double) over the grid-strided i of
// sum_squares_partial, in its order, so that sum_doubles over the partials is bit for bit the
// sum of squares of the three-kernel composition. Launched with exactly REDUCE_BLOCKS blocks.
extern "C" __global__ void add_scale_sum_squares_partial(float* acc, const float* x, double s,
                                                         double* partial, long long n) {
  double sq = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float a = acc[i] + x[i];
    float scaled = (float)((double)a * s);
    acc[i] = scaled;
    double xi = scaled;
    sq += xi * xi;
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) partial[blockIdx.x] = sq;
}
