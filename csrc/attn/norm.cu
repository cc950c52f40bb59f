// Residual add + RMSNorm (transformers' LlamaRMSNorm in float32: mean of squares, rsqrt, x * r, then times the
// weight) and SiLU(gate) * up, for the fast decoder (dcc/runtime/fastlm/ops.py). One CTA per row of the norm.
// A decode step runs these on one row per sequence: their time is latency, not bandwidth. The row kernel for
// H % 4 == 0, H <= 4 * 256 * 8 holds the row in registers (float4 per step): every load of the row is issued
// before the first use (one round trip to memory instead of one per loop iteration, measured 10 us -> ~2 us a
// call on an H100 at H = 4096), and the normalised values are written from the registers without a second read.
#include "../common/pdl.cuh"
#include "../common/rmsnorm_row.cuh"
#include "attn.h"
#include "common.cuh"

namespace dcc_attn {
namespace {

constexpr int kThreads = 256;

// 1 / sqrt(mean of squares + eps) of a row from each thread's partial sum of squares: warps, then the warps' sums in
// a fixed order; the mean is sum / H (torch divides), rsqrtf is within 2 ulp of the rounded rsqrt.
__device__ __forceinline__ float row_rsqrt(float ss, int H, float eps, float* warp_part) {
  ss = warp_sum<32>(ss);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) total += warp_part[k];
  return rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(H)), eps));
}

__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(float* __restrict__ h, const void* delta,
                                                               const void* w, void* out, int H, float eps, int dt,
                                                               int norm) {
  __shared__ float warp_part[kThreads / 32];
  const long long row = static_cast<long long>(blockIdx.x) * H;
  dcc_pdl::launch_dependents();   // PDL (../common/pdl.cuh): h and delta are the previous kernels' outputs
  dcc_pdl::wait();
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += kThreads) {
    float v = __ldcg(h + row + i);
    if (delta != nullptr) {
      v = __fadd_rn(v, load16(delta, row + i, dt));   // h + delta, float32 (the reference's residual add)
      h[row + i] = v;
    }
    if (norm) ss = __fmaf_rn(v, v, ss);
    else storex(out, row + i, v, dt);
  }
  if (!norm) return;
  const float r = row_rsqrt(ss, H, eps, warp_part);
  for (int i = threadIdx.x; i < H; i += kThreads) {
    const float v = __ldcg(h + row + i);
    storex(out, row + i, __fmul_rn(load16(w, i, dt), __fmul_rn(v, r)), dt);
  }
}

// The row in registers (../common/rmsnorm_row.cuh, shared with csrc/w4a16's GEMV that ends in this norm): V float4
// per thread (element 4 (threadIdx.x + k kThreads) + j). Same operations per element as add_rmsnorm_kernel (rounded
// add, fma into the thread's sum, one rsqrt, two rounded products); only the order of the sum of squares differs (a
// float32 sum: within the tests' tolerance of torch's own order).
template <int V>
__global__ void __launch_bounds__(kThreads) add_rmsnorm_regs_kernel(float* __restrict__ h, const void* delta,
                                                                    const void* w, void* out, int H, float eps,
                                                                    int dt, int norm) {
  static_assert(kThreads == dcc_rmsnorm::kRowThreads, "one thread of the row per thread of the block");
  __shared__ float warp_part[kThreads / 32];
  const long long row = static_cast<long long>(blockIdx.x) * H;
  const int n4 = H / 4;
  // PDL (../common/pdl.cuh): the norm's weight (constant) is loaded while the previous kernel finishes; h and delta
  // after the wait
  dcc_pdl::launch_dependents();
  float4 gw[V];
  dcc_rmsnorm::load_weight<V>(norm ? w : nullptr, norm ? n4 : 0, dt, gw);
  dcc_pdl::wait();
  float4 x[V];
  dcc_rmsnorm::load_add<V>(h + row, delta == nullptr ? nullptr : static_cast<const uint16_t*>(delta) + row, n4, dt,
                           x);
  if (!norm) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < n4) dcc_rmsnorm::store4_16(out, row + 4 * c, x[k], dt);
    }
    return;
  }
  const float r = dcc_rmsnorm::row_rsqrt<V>(x, H, eps, warp_part);
  dcc_rmsnorm::store_norm<V>(static_cast<uint16_t*>(out) + row, x, gw, r, n4, dt);
}

// SiLU(gate) * up: grid (column blocks, row blocks); a thread takes columns of rows (no 64-bit index division).
__global__ void silu_mul_kernel(const void* gu, void* out, int M, int I, long long stride, int block, int dt) {
  dcc_pdl::launch_dependents();   // PDL (../common/pdl.cuh): gate and up are the previous kernel's output
  dcc_pdl::wait();
  for (long long m = blockIdx.y; m < M; m += gridDim.y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < I; i += gridDim.x * blockDim.x) {
      // gate of column i, and its up `block` (interleaved) or I (halves) elements further
      const long long gi = m * stride + (block > 0 ? (i / block) * 2LL * block + i % block : i);
      const float g = load16(gu, gi, dt), u = load16(gu, gi + (block > 0 ? block : I), dt);
      // torch's silu in float32: x / (1 + exp(-x)); then times up in float32, rounded once to the 16-bit out
      const float s = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));
      storex(out, m * I + i, __fmul_rn(s, u), dt);
    }
  }
}

}  // namespace

cudaError_t add_rmsnorm(float* h, const void* delta, const void* w, void* out, int M, int H, float eps, int dt,
                        int norm, cudaStream_t stream) {
  if (M <= 0 || H <= 0 || (dt != 0 && dt != 1)) return cudaErrorInvalidValue;
  const int v = (H / 4 + kThreads - 1) / kThreads;   // float4 per thread
  const bool aligned = H % 4 == 0 && reinterpret_cast<uintptr_t>(h) % 16 == 0 &&
                       (delta == nullptr || reinterpret_cast<uintptr_t>(delta) % 8 == 0) &&
                       reinterpret_cast<uintptr_t>(w) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0;
  if (aligned && v <= 8) {
#define DCC_NORM_V(V)                                                                                          \
  case V:                                                                                                     \
    return dcc_pdl::launch(add_rmsnorm_regs_kernel<V>, dim3(M), dim3(kThreads), 0, stream, h, delta, w, out, H, eps, \
                           dt, norm);
    switch (v <= 1 ? 1 : v <= 2 ? 2 : v <= 4 ? 4 : 8) {
      DCC_NORM_V(1)
      DCC_NORM_V(2)
      DCC_NORM_V(4)
      DCC_NORM_V(8)
    }
#undef DCC_NORM_V
  }
  return dcc_pdl::launch(add_rmsnorm_kernel, dim3(M), dim3(kThreads), 0, stream, h, delta, w, out, H, eps, dt, norm);
}

cudaError_t silu_mul(const void* gu, void* out, int M, int I, long long stride, int block, int dt,
                     cudaStream_t stream) {
  if (M <= 0 || I <= 0 || (dt != 0 && dt != 1) || block < 0 || (block > 0 && I % block)) return cudaErrorInvalidValue;
  const int cols = (I + 255) / 256 < 64 ? (I + 255) / 256 : 64;
  return dcc_pdl::launch(silu_mul_kernel, dim3(cols, M < 65535 ? M : 65535), dim3(256), 0, stream, gu, out, M, I,
                         stride, block, dt);
}

}  // namespace dcc_attn
