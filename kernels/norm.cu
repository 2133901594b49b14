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

// The step's gradient norm, clipping factor and skip flag on the device (a CUDA-graph step has
// no host round trip between the reducer and AdamW), bit for bit the host's
// crystal.reducer.norm_of, crystal.optim.clip_scale and the trainer's finiteness test:
// total = chunk_sums[0] + chunk_sums[1] + ... in chunk order from 0.0, norm = sqrt(total);
// scale = max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1, rounded once to float;
// skip = 1 if norm or any of losses[0..n_losses) is not finite. Writes out[0] = norm and
// s[8] = scale, s[9] = skip (AdamW's scalars, adamw.cu). One thread.
extern "C" __global__ void step_scalars(double* out, float* s, const double* chunk_sums,
                                        int n_chunks, const double* losses, int n_losses,
                                        double max_norm) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double total = 0.0;
  for (int c = 0; c < n_chunks; c++) total += chunk_sums[c];
  double norm = sqrt(total);
  bool finite = isfinite(norm);
  for (int i = 0; i < n_losses; i++) finite = finite && isfinite(losses[i]);
  double scale = (max_norm > 0.0 && norm > max_norm) ? max_norm / (norm + 1e-6) : 1.0;
  out[0] = norm;
  s[8] = (float)scale;
  s[9] = finite ? 0.0f : 1.0f;
}
