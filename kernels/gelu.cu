// GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3).

constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2/pi)

// out[i] = 0.5 x (1 + tanh u); grid_1d(N).
extern "C" __global__ void gelu_forward(float* out, const float* inp, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float x = inp[i];
  out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
}

// dinp[i] = (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u') dout[i],
// u' = sqrt(2/pi) (1 + 3*0.044715 x^2); grid_1d(N). dinp may alias dout.
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  float x = inp[i];
  float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
  float du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
  dinp[i] = (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du) * dout[i];
}
