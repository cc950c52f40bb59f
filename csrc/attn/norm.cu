// Residual add + RMSNorm (transformers' LlamaRMSNorm in float32: mean of squares, rsqrt, x * r, then times the
// weight) and SiLU(gate) * up, for the fast decoder (dcc/runtime/fastlm/ops.py). One CTA per row of the norm.
// A decode step runs these on one row per sequence: their time is latency, not bandwidth. The row kernel for
// H % 4 == 0, H <= 4 * 256 * 8 holds the row in registers (float4 per step): every load of the row is issued
// before the first use (one round trip to memory instead of one per loop iteration, measured 10 us -> ~2 us a
// call on an H100 at H = 4096), and the normalised values are written from the registers without a second read.
#include "../common/pdl.cuh"
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

// Four 16-bit values (8 bytes) from / to index i (a multiple of 4).
__device__ __forceinline__ float4 load4_16(const void* p, long long i, int dt) {
  const uint2 raw = __ldcg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i));   // L2: common.cuh
  const uint16_t* e = reinterpret_cast<const uint16_t*>(&raw);
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = dt == 0 ? __half2float(__ushort_as_half(e[j])) : __bfloat162float(__ushort_as_bfloat16(e[j]));
  }
  return make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store4_16(void* p, long long i, float4 v, int dt) {
  uint2 raw;
  uint16_t* e = reinterpret_cast<uint16_t*>(&raw);
  const float f[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    e[j] = dt == 0 ? __half_as_ushort(__float2half_rn(f[j])) : __bfloat16_as_ushort(__float2bfloat16_rn(f[j]));
  }
  *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) = raw;
}

// The row in registers: V float4 per thread (element 4 (threadIdx.x + k kThreads) + j). Same operations per element
// as add_rmsnorm_kernel (rounded add, fma into the thread's sum, one rsqrt, two rounded products); only the order of
// the sum of squares differs (a float32 sum: within the tests' tolerance of torch's own order).
template <int V>
__global__ void __launch_bounds__(kThreads) add_rmsnorm_regs_kernel(float* __restrict__ h, const void* delta,
                                                                    const void* w, void* out, int H, float eps,
                                                                    int dt, int norm) {
  __shared__ float warp_part[kThreads / 32];
  const long long row = static_cast<long long>(blockIdx.x) * H;
  const int n4 = H / 4;
  // PDL (../common/pdl.cuh): the norm's weight (constant) is loaded while the previous kernel finishes; h and delta
  // after the wait
  dcc_pdl::launch_dependents();
  float4 gw[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kThreads;
    gw[k] = norm && c < n4 ? load4_16(w, 4 * c, dt) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  dcc_pdl::wait();
  float4 x[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kThreads;
    x[k] = c < n4 ? __ldcg(reinterpret_cast<const float4*>(h + row) + c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (delta != nullptr) {
    float4 d[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = threadIdx.x + k * kThreads;
      d[k] = c < n4 ? load4_16(delta, row + 4 * c, dt) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = threadIdx.x + k * kThreads;
      x[k] = make_float4(__fadd_rn(x[k].x, d[k].x), __fadd_rn(x[k].y, d[k].y), __fadd_rn(x[k].z, d[k].z),
                         __fadd_rn(x[k].w, d[k].w));   // h + delta, float32 (the reference's residual add)
      if (c < n4) reinterpret_cast<float4*>(h + row)[c] = x[k];
    }
  }
  if (!norm) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < n4) store4_16(out, row + 4 * c, x[k], dt);
    }
    return;
  }
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    ss = __fmaf_rn(x[k].x, x[k].x, ss);
    ss = __fmaf_rn(x[k].y, x[k].y, ss);
    ss = __fmaf_rn(x[k].z, x[k].z, ss);
    ss = __fmaf_rn(x[k].w, x[k].w, ss);
  }
  const float r = row_rsqrt(ss, H, eps, warp_part);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kThreads;
    if (c < n4) {
      const float4 g = gw[k];
      store4_16(out, row + 4 * c,
                make_float4(__fmul_rn(g.x, __fmul_rn(x[k].x, r)), __fmul_rn(g.y, __fmul_rn(x[k].y, r)),
                            __fmul_rn(g.z, __fmul_rn(x[k].z, r)), __fmul_rn(g.w, __fmul_rn(x[k].w, r))),
                dt);
    }
  }
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
