// QServe's per-token int8 activation quantization (research/targets.md 1A), bit-identical to
// dcc/ir/actquant.py:quantize_tokens_int8 for codes and scale:
//   amax = max |x| (fp16 values, exact in float), scale = fp16(fp32(amax / 127)),
//   code = rn_even(fp32(x * fp32(fp32(1 / amax) * 127))) saturated to [-128, 127]; amax == 0 gives codes 0 and scale 0.
// asum = fp16 of the sum of the fp16 inputs. The sum is accumulated in double, which is exact for any order
// (fp16 values are multiples of 2^-24 below 2^16; K <= 2^13 terms stay below 2^53 units), so asum is
// fp16(exact sum): deterministic, and equal to the CPU rule's fp16(fp32 sum) except where fp32 rounding moved it.
#include <cstdint>

#include <cuda_fp16.h>

#include "common.cuh"

namespace dcc_w4a8 {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int8_t code_of(float x, float inv) {
  int q = __float2int_rn(__fmul_rn(x, inv));   // one float32 product, round half to even (torch.round)
  q = max(-128, min(127, q));
  return static_cast<int8_t>(q);
}

// Block reduction of (amax, exact sum); thread 0 writes scale and sum; returns 127/amax (CPU rule) to every thread.
__device__ __forceinline__ float finish_stats(float amax, double sum, __half* ascale, __half* asum, int m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  __shared__ float s_amax[kThreads / 32];
  __shared__ double s_sum[kThreads / 32];
  __shared__ float s_inv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_amax[warp] = amax;
    s_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f;
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) {
      a = fmaxf(a, s_amax[w]);
      s += s_sum[w];
    }
    // 127 / amax as the CPU rule evaluates it: torch computes `127.0 / amax` as reciprocal(amax) * 127 (two
    // float32 roundings; a true division differs in the last bit for about a quarter of the values)
    s_inv = a > 0.f ? __fmul_rn(__frcp_rn(a), 127.f) : 0.f;
    ascale[m] = __float2half_rn(__fdiv_rn(a, 127.f));
    if (asum) asum[m] = __double2half(s);
  }
  __syncthreads();
  return s_inv;
}

__device__ __forceinline__ void stats8(const uint4& v, float& amax, double& sum) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    sum += static_cast<double>(f.x) + static_cast<double>(f.y);
  }
}

__device__ __forceinline__ uint2 codes8(const uint4& v, float inv) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
  uint32_t packed[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    const uint32_t pair = static_cast<uint8_t>(code_of(f.x, inv)) | (static_cast<uint32_t>(static_cast<uint8_t>(
                                                                         code_of(f.y, inv))) << 8);
    if (i % 2 == 0) packed[i / 2] = pair; else packed[i / 2] |= pair << 16;
  }
  return make_uint2(packed[0], packed[1]);
}

// K % 8 == 0 and K <= kThreads * 8 * NC: each thread loads its NC 16-byte chunks at once (independent loads in
// flight, not one round trip per loop iteration) and keeps them in registers for the second pass.
// Programmatic dependent launch (sm_90+), both ways. This kernel lets its dependents launch as soon as every block
// runs: a GEMM launched next with the PDL attribute (the cluster GEMV, gemm_wgmma) starts and prefetches its weights,
// and waits for this grid before it reads xq. It is itself launched with the attribute (quant_act below), so it may
// start while the kernel before it (the previous layer's GEMM, which reads xq) still runs; it reads x and writes xq,
// ascale and asum only after that kernel has completed (griddepcontrol.wait; a no-op where nothing is pending). The
// next GEMM's CTAs can then stream their weights beside the previous GEMM's tail (H200, 4096x4096, M = 16,
// activation quantization + GEMM in a row: csrc/w4a8/DESIGN.md).
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <int NC>
__global__ void __launch_bounds__(kThreads) quant_act_regs(const __half* __restrict__ x, int8_t* __restrict__ xq,
                                                           __half* __restrict__ ascale, __half* __restrict__ asum,
                                                           int K) {
  pdl_prologue();
  const int m = blockIdx.x;
  const __half* row = x + static_cast<size_t>(m) * K;
  int8_t* qrow = xq + static_cast<size_t>(m) * K;
  uint4 v[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int k = (c * kThreads + threadIdx.x) * 8;
    v[c] = k < K ? *reinterpret_cast<const uint4*>(row + k) : make_uint4(0, 0, 0, 0);
  }
  float amax = 0.f;
  double sum = 0.0;
#pragma unroll
  for (int c = 0; c < NC; ++c) stats8(v[c], amax, sum);   // zero padding changes neither max nor sum
  const float inv = finish_stats(amax, sum, ascale, asum, m);
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int k = (c * kThreads + threadIdx.x) * 8;
    if (k < K) *reinterpret_cast<uint2*>(qrow + k) = codes8(v[c], inv);
  }
}

// Any K: two passes over the row (the second from L1/L2).
__global__ void __launch_bounds__(kThreads) quant_act_loop(const __half* __restrict__ x, int8_t* __restrict__ xq,
                                                           __half* __restrict__ ascale, __half* __restrict__ asum,
                                                           int K) {
  pdl_prologue();
  const int m = blockIdx.x;
  const __half* row = x + static_cast<size_t>(m) * K;
  int8_t* qrow = xq + static_cast<size_t>(m) * K;
  float amax = 0.f;
  double sum = 0.0;
  for (int k = threadIdx.x; k < K; k += kThreads) {
    const float f = __half2float(row[k]);
    amax = fmaxf(amax, fabsf(f));
    sum += static_cast<double>(f);
  }
  const float inv = finish_stats(amax, sum, ascale, asum, m);
  for (int k = threadIdx.x; k < K; k += kThreads) qrow[k] = code_of(__half2float(row[k]), inv);
}

}  // namespace

cudaError_t quant_act(const void* x, void* xq, void* ascale, void* asum, int M, int K, cudaStream_t stream) {
  if (M < 0 || K <= 0 || !x || !xq || !ascale) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  auto xp = static_cast<const __half*>(x);
  auto qp = static_cast<int8_t*>(xq);
  auto sp = static_cast<__half*>(ascale);
  auto up = static_cast<__half*>(asum);
  const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xq) % 8 == 0;
  const int chunks = (K / 8 + kThreads - 1) / kThreads;   // 16-byte chunks per thread
  auto fn = vec && chunks <= 1 ? quant_act_regs<1>
          : vec && chunks <= 2 ? quant_act_regs<2>
          : vec && chunks <= 4 ? quant_act_regs<4>
          : vec && chunks <= 8 ? quant_act_regs<8>
                               : quant_act_loop;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(M);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (device_major() >= 9) {   // programmatic dependent launch: sm_90+
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, fn, xp, qp, sp, up, K);
}

}  // namespace dcc_w4a8
