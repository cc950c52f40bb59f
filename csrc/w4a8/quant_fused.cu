// QServe's fused activation ops, executed as its kernels execute them (mit-han-lab/qserve de6a2ec built with
// --use_fast_math; the instruction sequence is written down in dcc/targets/qserve/numerics_fused.py):
//   norm_quant: rms_norm_general[_fuse_sum] -- a layer norm (mean subtracted, no bias) with per-token int8 codes,
//               fp16 scale and (asum != null) the fp16 sum of the fp16 normed values accumulated in fp16 per thread;
//   norm_y + quant_normed: norm_quant cut at its float32 normed values (same bits, two launches);
//   quant_engine: the standalone quant_kernel[_fuse_sum] (float32 sum in the engine's order, MUFU.RCP);
//   silu_mul:   silu_and_mul -- fp16(fp16(g * rcp(1 + ex2(-g * log2 e))) * u).
// One CTA per token with the engine's block (32 * ceil(min(H, 1024) / 32) threads), the same per-thread loops and the
// same xor butterflies, so every float32 sum is formed in the engine's order. Each operation is an explicit _rn
// intrinsic (no contraction other than the engine's own FFMAs, no fast-math rewriting). approx = 1: the engine's
// approximate instructions (rcp.approx.ftz, rsqrt.approx.ftz, ex2.approx.ftz: MUFU.RCP / RSQ / EX2), i.e. QServe's
// results bit for bit; approx = 0: the correctly rounded results that dcc's CPU emulation stands in for them, i.e.
// the CPU emulation's results bit for bit.
#include <algorithm>
#include <cstdint>

#include <cuda_fp16.h>

#include "w4a8.h"

namespace dcc_w4a8 {
namespace {

constexpr int kMaxThreads = 1024;

// The engine's block for its norm kernels: min(H, 1024) threads rounded up to whole warps.
int norm_threads(int H) { return 32 * ((std::min(H, kMaxThreads) + 31) / 32); }

__device__ __forceinline__ float rcp_of(float v, bool approx) {
  if (approx) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
  }
  return __frcp_rn(v);
}

__device__ __forceinline__ float rsqrt_of(float v, bool approx) {
  if (approx) {
    float r;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
  }
  return __double2float_rn(1.0 / sqrt(static_cast<double>(v)));   // as the CPU stand-in: float64, one rounding
}

__device__ __forceinline__ float ex2_of(float v, bool approx) {
  if (approx) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
  }
  return __double2float_rn(exp2(static_cast<double>(v)));
}

__device__ __forceinline__ int8_t code_rni_sat(float v) {   // cvt.rni.sat.s8.f32: nearest even, saturate, NaN -> 0
  int q;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(q) : "f"(v));
  return static_cast<int8_t>(q);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, mask, 32));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, mask, 32));
  return v;
}

// The engine's block reductions (reduction_utils.cuh): each warp's butterfly, lane 0 of each to shared memory, then
// every warp butterflies the warp results (lanes past blockDim / 32 read `fill`); every thread gets thread 0's value.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();   // `shared` may still be read by a previous reduction
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : (kMax ? -1e20f : 0.f);
  return kMax ? warp_max(v) : warp_sum(v);
}

// Steps a-b of generalLayerNorm (numerics_fused.py): the row's mean and rs = rsqrt(variance + eps), every thread
// getting thread 0's values.
struct MeanRs {
  float mean, rs;
};

__device__ __forceinline__ MeanRs mean_rs(const __half* __restrict__ row, int H, float eps, bool approx,
                                          float* shared) {
  __shared__ float s_mean, s_rs;
  const int t = threadIdx.x, B = blockDim.x;
  float s = 0.f;
  for (int i = t; i < H; i += B) s = __fadd_rn(__half2float(row[i]), s);
  s = block_reduce<false>(s, shared);
  const float inv_h = rcp_of(static_cast<float>(H), approx);   // I2F then MUFU.RCP
  if (t == 0) s_mean = __fmul_rn(s, inv_h);
  __syncthreads();
  const float mean = s_mean;
  float v = 0.f;
  for (int i = t; i < H; i += B) {
    const float d = __fsub_rn(__half2float(row[i]), mean);
    v = __fmaf_rn(d, d, v);                                     // `local_var_sum += diff * diff`, contracted
  }
  v = block_reduce<false>(v, shared);
  if (t == 0) s_rs = rsqrt_of(__fmaf_rn(v, inv_h, eps), approx);   // `variance / hidden_dim + eps`, contracted
  __syncthreads();
  return {mean, s_rs};
}

// y_i = (x_i - mean) * rs * gamma_i in float32 (step c), as the engine forms it in both of its loops.
__device__ __forceinline__ float normed(const __half* __restrict__ row, const __half* __restrict__ gamma, MeanRs m,
                                        int i) {
  return __fmul_rn(__fmul_rn(__fsub_rn(__half2float(row[i]), m.mean), m.rs), __half2float(gamma[i]));
}

// Steps c-e on one token's float32 normed values y_of(i): amax and (asum != null) the per-thread fp16 sum from
// fp16(y), the block reductions, codes from y itself, the fp16 scale and sum of this token.
template <typename YOf>
__device__ __forceinline__ void quantize_row(YOf y_of, int H, bool approx, int8_t* __restrict__ qrow,
                                             __half* __restrict__ ascale, __half* __restrict__ asum, float* shared) {
  const int t = threadIdx.x, B = blockDim.x;
  __half amax = __float2half_rn(1e-6f), hsum = __float2half_rn(0.f);
  for (int i = t; i < H; i += B) {
    const __half h = __float2half_rn(y_of(i));
    if (__hgt(__habs(h), amax)) amax = __habs(h);
    hsum = __hadd(hsum, h);                                     // one fp16 rounding per add
  }
  const float a = block_reduce<true>(__half2float(amax), shared);
  const float total = asum ? block_reduce<false>(__half2float(hsum), shared) : 0.f;
  const float r127 = __fmul_rn(rcp_of(a, approx), 127.f);
  for (int i = t; i < H; i += B) qrow[i] = code_rni_sat(__fmul_rn(r127, y_of(i)));   // y recomputed (no shmem)
  if (t == 0) {
    ascale[blockIdx.x] = __float2half_rn(__fmul_rn(a, __int_as_float(0x3C010204)));   // fp32(1 / 127)
    if (asum) asum[blockIdx.x] = __float2half_rn(total);
  }
}

__global__ void __launch_bounds__(kMaxThreads) norm_quant_kernel(const __half* __restrict__ x,
                                                                 const __half* __restrict__ gamma, float eps,
                                                                 int8_t* __restrict__ xq, __half* __restrict__ ascale,
                                                                 __half* __restrict__ asum, int H, bool approx) {
  __shared__ float shared[32];
  const __half* row = x + static_cast<size_t>(blockIdx.x) * H;
  const MeanRs m = mean_rs(row, H, eps, approx, shared);
  quantize_row([&](int i) { return normed(row, gamma, m, i); }, H, approx, xq + static_cast<size_t>(blockIdx.x) * H,
               ascale, asum, shared);
}

// The fused kernel cut in two at the float32 normed values, for a runtime whose graph keeps the norm and the
// linears apart: norm_y writes y (steps a-c), quant_normed quantizes it (c-e) with the same block and thread loops,
// so codes, scale and sum equal norm_quant's bit for bit.
__global__ void __launch_bounds__(kMaxThreads) norm_y_kernel(const __half* __restrict__ x,
                                                             const __half* __restrict__ gamma, float eps,
                                                             float* __restrict__ y, int H, bool approx) {
  __shared__ float shared[32];
  const __half* row = x + static_cast<size_t>(blockIdx.x) * H;
  const MeanRs m = mean_rs(row, H, eps, approx, shared);
  float* yrow = y + static_cast<size_t>(blockIdx.x) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) yrow[i] = normed(row, gamma, m, i);
}

__global__ void __launch_bounds__(kMaxThreads) quant_normed_kernel(const float* __restrict__ y,
                                                                   int8_t* __restrict__ xq,
                                                                   __half* __restrict__ ascale,
                                                                   __half* __restrict__ asum, int H, bool approx) {
  __shared__ float shared[32];
  const float* yrow = y + static_cast<size_t>(blockIdx.x) * H;
  quantize_row([&](int i) { return yrow[i]; }, H, approx, xq + static_cast<size_t>(blockIdx.x) * H, ascale, asum,
               shared);
}

// QServe's standalone quant_kernel[_fuse_sum] (fused_kernels.cu; numerics.py), for o_proj's and down_proj's inputs:
// B = min(K, 1024) threads per token, amax from 0 and (asum != null) the sum in float32 per thread, the block
// reductions, scale = fp16(amax * fp32(1/127)), codes = cvt.rni.sat.s8(x * (rcp(amax) * 127)).
__global__ void __launch_bounds__(kMaxThreads) quant_engine_kernel(const __half* __restrict__ x,
                                                                   int8_t* __restrict__ xq,
                                                                   __half* __restrict__ ascale,
                                                                   __half* __restrict__ asum, int K, bool approx) {
  __shared__ float shared[32];
  const __half* row = x + static_cast<size_t>(blockIdx.x) * K;
  const int t = threadIdx.x, B = blockDim.x;
  float amax = 0.f, s = 0.f;
  for (int i = t; i < K; i += B) {
    const float v = __half2float(row[i]);
    s = __fadd_rn(s, v);
    const float a = v > 0.f ? v : -v;
    if (a > amax) amax = a;
  }
  const float a = block_reduce<true>(amax, shared);
  const float total = asum ? block_reduce<false>(s, shared) : 0.f;
  const float r127 = __fmul_rn(rcp_of(a, approx), 127.f);
  int8_t* qrow = xq + static_cast<size_t>(blockIdx.x) * K;
  for (int i = t; i < K; i += B) qrow[i] = code_rni_sat(__fmul_rn(__half2float(row[i]), r127));
  if (t == 0) {
    ascale[blockIdx.x] = __float2half_rn(__fmul_rn(a, __int_as_float(0x3C010204)));   // fp32(1 / 127)
    if (asum) asum[blockIdx.x] = __float2half_rn(total);
  }
}

__global__ void silu_mul_kernel(const __half* __restrict__ gate, const __half* __restrict__ up,
                                __half* __restrict__ out, int D, bool approx) {
  const size_t base = static_cast<size_t>(blockIdx.x) * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float g = __half2float(gate[base + i]);
    const float e = ex2_of(__fmul_rn(-g, __int_as_float(0x3FB8AA3B)), approx);   // fp32(log2 e)
    const __half s = __float2half_rn(__fmul_rn(g, rcp_of(__fadd_rn(e, 1.f), approx)));
    out[base + i] = __float2half_rn(__fmul_rn(__half2float(s), __half2float(up[base + i])));
  }
}

}  // namespace

cudaError_t norm_quant(const void* x, const void* gamma, float eps, void* xq, void* ascale, void* asum, int M, int H,
                       int approx, cudaStream_t stream) {
  if (M < 0 || H <= 0 || !x || !gamma || !xq || !ascale) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  norm_quant_kernel<<<M, norm_threads(H), 0, stream>>>(static_cast<const __half*>(x),
                                                        static_cast<const __half*>(gamma), eps,
                                                        static_cast<int8_t*>(xq), static_cast<__half*>(ascale),
                                                        static_cast<__half*>(asum), H, approx != 0);
  return cudaGetLastError();
}

cudaError_t norm_y(const void* x, const void* gamma, float eps, void* y, int M, int H, int approx,
                   cudaStream_t stream) {
  if (M < 0 || H <= 0 || !x || !gamma || !y) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  norm_y_kernel<<<M, norm_threads(H), 0, stream>>>(static_cast<const __half*>(x), static_cast<const __half*>(gamma),
                                                   eps, static_cast<float*>(y), H, approx != 0);
  return cudaGetLastError();
}

cudaError_t quant_normed(const void* y, void* xq, void* ascale, void* asum, int M, int H, int approx,
                         cudaStream_t stream) {
  if (M < 0 || H <= 0 || !y || !xq || !ascale) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  quant_normed_kernel<<<M, norm_threads(H), 0, stream>>>(static_cast<const float*>(y), static_cast<int8_t*>(xq),
                                                         static_cast<__half*>(ascale), static_cast<__half*>(asum), H,
                                                         approx != 0);
  return cudaGetLastError();
}

cudaError_t quant_engine(const void* x, void* xq, void* ascale, void* asum, int M, int K, int approx,
                         cudaStream_t stream) {
  if (M < 0 || K <= 0 || !x || !xq || !ascale) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  // the engine's block is min(K, 1024) threads; a partial last warp (K % 32 != 0, which the W4A8 layout excludes)
  // runs here with its missing lanes reading 0 in the reductions, as the CPU emulation assumes
  quant_engine_kernel<<<M, std::min(K, kMaxThreads), 0, stream>>>(static_cast<const __half*>(x),
                                                                  static_cast<int8_t*>(xq),
                                                                  static_cast<__half*>(ascale),
                                                                  static_cast<__half*>(asum), K, approx != 0);
  return cudaGetLastError();
}

cudaError_t silu_mul(const void* gate, const void* up, void* out, int M, int D, int approx, cudaStream_t stream) {
  if (M < 0 || D <= 0 || !gate || !up || !out) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  silu_mul_kernel<<<M, std::min(D, kMaxThreads), 0, stream>>>(static_cast<const __half*>(gate),
                                                              static_cast<const __half*>(up),
                                                              static_cast<__half*>(out), D, approx != 0);
  return cudaGetLastError();
}

}  // namespace dcc_w4a8
