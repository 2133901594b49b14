// Column sums of a row-major [N, C] array in two launches, in a fixed order that depends on N,
// C and the number of parts P alone (never on blockDim.x, the device or who launched it), with
// no atomics (the parameter gradients of layernorm.cu and matmul.cu):
//   1. a "partial" kernel, grid (cdiv(C, blockDim.x), P): block (x, r) sums part r's rows,
//      column_part_rows, one thread per column, rows in order, into partial[r, c];
//   2. a "sum" kernel, one warp per column: column_sum_of_parts adds the P partials.
// P comes from crystal/backends/kernels.py (column_parts: about 64 rows a part, at most
// COLUMN_PARTS_MAX parts) and reaches the kernels as gridDim.y (stage 1) and an argument
// (stage 2).
#ifndef CRYSTAL_COLUMN_REDUCE_CUH
#define CRYSTAL_COLUMN_REDUCE_CUH

// Rows [begin, end) of part blockIdx.y of gridDim.y: consecutive runs of cdiv(N, gridDim.y)
// rows; the last parts may be shorter or empty (end <= begin).
__device__ inline void column_part_rows(int N, int& begin, int& end) {
  int P = (int)gridDim.y;
  int rows = (N + P - 1) / P;
  begin = (int)blockIdx.y * rows;
  end = N - begin < rows ? N : begin + rows;
}

// sum over r = 0..P-1 of partial[r*C + c], the same bits in every lane of the calling warp: lane
// l adds the parts r = l, l + 32, l + 64, ... in order, then xor-shuffles across the warp (an
// order fixed by the warp width, 32, alone). c must be the same in the whole warp; a warp with
// c >= C adds nothing, but every thread of the block must call (the shuffles).
__device__ inline float column_sum_of_parts(const float* partial, int P, int C, int c) {
  float s = 0.0f;
  if (c < C)
    for (int r = (int)(threadIdx.x & 31); r < P; r += 32) s += partial[(long long)r * C + c];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

#endif
