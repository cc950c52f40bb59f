// Residual add + RMSNorm (transformers' LlamaRMSNorm in float32: mean of squares, rsqrt, x * r, then times the
// weight) and SiLU(gate) * up, for the fast decoder (dcc/runtime/fastlm/ops.py). One CTA per row.
#include "attn.h"
#include "common.cuh"

namespace dcc_attn {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(float* __restrict__ h, const void* delta,
                                                               const void* w, void* out, int H, float eps, int dt,
                                                               int norm) {
  __shared__ float warp_part[kThreads / 32];
  const long long row = static_cast<long long>(blockIdx.x) * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += kThreads) {
    float v = h[row + i];
    if (delta != nullptr) {
      v = __fadd_rn(v, load16(delta, row + i, dt));   // h + delta, float32 (the reference's residual add)
      h[row + i] = v;
    }
    if (norm) ss = __fmaf_rn(v, v, ss);
    else storex(out, row + i, v, dt);
  }
  if (!norm) return;
  ss = warp_sum<32>(ss);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) total += warp_part[k];
  // rsqrt(mean + eps): the mean is sum / H (torch divides), rsqrtf is within 2 ulp of the rounded rsqrt
  const float r = rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(H)), eps));
  for (int i = threadIdx.x; i < H; i += kThreads) {
    const float v = h[row + i];
    storex(out, row + i, __fmul_rn(load16(w, i, dt), __fmul_rn(v, r)), dt);
  }
}

__global__ void silu_mul_kernel(const void* gu, void* out, int M, int I, long long stride, int dt) {
  const long long n = static_cast<long long>(M) * I;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long m = e / I, i = e % I;
    const float g = load16(gu, m * stride + i, dt), u = load16(gu, m * stride + I + i, dt);
    // torch's silu in float32: x / (1 + exp(-x)); then times up in float32, rounded once to the 16-bit out
    const float s = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));
    storex(out, e, __fmul_rn(s, u), dt);
  }
}

}  // namespace

cudaError_t add_rmsnorm(float* h, const void* delta, const void* w, void* out, int M, int H, float eps, int dt,
                        int norm, cudaStream_t stream) {
  if (M <= 0 || H <= 0 || (dt != 0 && dt != 1)) return cudaErrorInvalidValue;
  add_rmsnorm_kernel<<<M, kThreads, 0, stream>>>(h, delta, w, out, H, eps, dt, norm);
  return cudaGetLastError();
}

cudaError_t silu_mul(const void* gu, void* out, int M, int I, long long stride, int dt, cudaStream_t stream) {
  if (M <= 0 || I <= 0 || (dt != 0 && dt != 1)) return cudaErrorInvalidValue;
  const long long n = static_cast<long long>(M) * I;
  const int blocks = static_cast<int>((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
  silu_mul_kernel<<<blocks, 256, 0, stream>>>(gu, out, M, I, stride, dt);
  return cudaGetLastError();
}

}  // namespace dcc_attn
