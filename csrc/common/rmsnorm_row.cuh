// One row's residual add + RMSNorm held in registers (transformers' LlamaRMSNorm in float32: h += delta, mean of
// squares, rsqrt, h * r, then times the weight), shared by the norm kernel of csrc/attn (norm.cu) and the W4A16 GEMV
// that ends in it (csrc/w4a16, the fast decoder's o and down projections), so that both give the same bits.
//
// Thread mapping: threads 0..255 of the block hold the row, thread t the float4s t + 256 k, k < V (V = H / 1024
// rounded up to 1, 2, 4 or 8); threads from 256 up, where the block has them, hold nothing and only take part in the
// block barrier. Sum of squares: each thread's fma chain over its float4s, then a butterfly over the warp, then the
// eight warps' sums in warp order: a fixed order, whichever kernel runs it.
// Loads of earlier kernels' outputs go through L2 (ld.global.cg), as the rules of PDL launches want (pdl.cuh).
// Included as "../common/rmsnorm_row.cuh"; needs H % 4 == 0 and 8-byte aligned 16-bit rows (16-byte for h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dcc_rmsnorm {

constexpr int kRowThreads = 256;

// Whether this thread holds part of the row: kWide says the block may have more than kRowThreads threads (the
// GEMV's 512); a block of exactly kRowThreads needs no test.
template <bool kWide>
__device__ __forceinline__ bool holds_row() {
  return !kWide || threadIdx.x < kRowThreads;
}

// Four 16-bit values (8 bytes) from / to index i (a multiple of 4); dt 0: fp16, 1: bf16.
__device__ __forceinline__ float4 load4_16(const void* p, long long i, int dt) {
  const uint2 raw = __ldcg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i));
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

// The norm's weight, this thread's float4s (zeros past the row).
template <int V, bool kWide = false>
__device__ __forceinline__ void load_weight(const void* w, int n4, int dt, float4 (&gw)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kRowThreads;
    gw[k] = holds_row<kWide>() && c < n4 ? load4_16(w, 4 * c, dt) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// x = h (+ delta, rounded float32 adds: the reference's residual add), h updated in place where delta is given.
template <int V, bool kWide = false>
__device__ __forceinline__ void load_add(float* h, const void* delta, int n4, int dt, float4 (&x)[V]) {
  const bool mine = holds_row<kWide>();
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kRowThreads;
    x[k] = mine && c < n4 ? __ldcg(reinterpret_cast<const float4*>(h) + c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (delta == nullptr) return;
  float4 d[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kRowThreads;
    d[k] = mine && c < n4 ? load4_16(delta, 4 * c, dt) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kRowThreads;
    x[k] = make_float4(__fadd_rn(x[k].x, d[k].x), __fadd_rn(x[k].y, d[k].y), __fadd_rn(x[k].z, d[k].z),
                       __fadd_rn(x[k].w, d[k].w));
    if (mine && c < n4) reinterpret_cast<float4*>(h)[c] = x[k];
  }
}

// 1 / sqrt(mean of squares + eps) of the row in x; every thread of the block calls it (one barrier; warp_part: 8
// floats of shared memory, free again once the next barrier has passed). The mean is sum / H (torch divides);
// rsqrtf is within 2 ulp of the rounded rsqrt.
template <int V, bool kWide = false>
__device__ __forceinline__ float row_rsqrt(const float4 (&x)[V], int H, float eps, float* warp_part) {
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    ss = __fmaf_rn(x[k].x, x[k].x, ss);
    ss = __fmaf_rn(x[k].y, x[k].y, ss);
    ss = __fmaf_rn(x[k].z, x[k].z, ss);
    ss = __fmaf_rn(x[k].w, x[k].w, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0 && holds_row<kWide>()) warp_part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kRowThreads / 32; ++k) total += warp_part[k];
  return rsqrtf(__fadd_rn(__fdiv_rn(total, static_cast<float>(H)), eps));
}

// out = weight * (x * r), each product rounded in float32, then once to the 16-bit type.
template <int V, bool kWide = false>
__device__ __forceinline__ void store_norm(void* out, const float4 (&x)[V], const float4 (&gw)[V], float r, int n4,
                                           int dt) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x + k * kRowThreads;
    if (holds_row<kWide>() && c < n4) {
      const float4 g = gw[k];
      store4_16(out, 4 * c,
                make_float4(__fmul_rn(g.x, __fmul_rn(x[k].x, r)), __fmul_rn(g.y, __fmul_rn(x[k].y, r)),
                            __fmul_rn(g.z, __fmul_rn(x[k].z, r)), __fmul_rn(g.w, __fmul_rn(x[k].w, r))),
                dt);
    }
  }
}

// float4s per thread for a row of H: 1, 2, 4 or 8; 0 where the row does not fit the registers (H > 8192).
inline int row_vectors(int H) {
  const int v = (H / 4 + kRowThreads - 1) / kRowThreads;
  return v <= 1 ? 1 : v <= 2 ? 2 : v <= 4 ? 4 : v <= 8 ? 8 : 0;
}

}  // namespace dcc_rmsnorm
