// The bias of a matmul out[N,OC] (the product itself is cuBLAS).

// out[i,o] += bias[o]; grid_1d(N*OC).
extern "C" __global__ void bias_forward(float* out, const float* bias, int N, int OC) {
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= (long long)N * OC) return;
  out[j] += bias[j % OC];
}

// dbias[o] = sum_i dout[i,o], rows i = 0..N-1 in order (written); grid_1d(OC): thread per column.
extern "C" __global__ void bias_backward(float* dbias, const float* dout, int N, int OC) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= OC) return;
  float acc = 0.0f;
  for (int i = 0; i < N; ++i) acc += dout[(long long)i * OC + o];
  dbias[o] = acc;
}
