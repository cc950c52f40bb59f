// The low-rank down-projection of the W4A4 activation kernel, blocked over tokens: lora_act [M, R] fp32 of the raw
// 16-bit x [M, K] and lora_down_t [K, R], with quant_act's numerics bit for bit (dcc/targets/nunchaku/cuda_numerics.py
// lora_down_act): per 64-k group g and rank r, p = fma chain over the group's k in order from +0; lora_act[m, r] =
// the fp32 sum of the p's in group order from +0 (here kept in a register instead of quant_act's workspace).
// quant_act's own version gives each token a CTA and reads every lora_down_t value once per token from L1 (three
// instructions per fma); here a CTA takes 32 tokens x 32 ranks, stages each group's x and lora_down_t in shared
// memory as fp32, and a thread keeps four tokens' chains (one 16-byte x load and one rank load per four fmas).
// Used by quant_act when DCC_W4A4_LORA_DOWN=blocked (read per call; to be made the default once measured).
#include <cstdint>

#include "common.cuh"

namespace dcc_w4a4 {
namespace {

constexpr int kTokB = 32, kRankB = 32, kThreadsL = 256;
constexpr int kXStride = kTokB + 4;    // floats per k row of the staged x (16-byte rows: LDS.128 of 4 tokens)
constexpr int kDStride = kRankB + 1;   // floats per k row of the staged lora_down_t

template <class T>
__device__ __forceinline__ void to_floats(uint4 v, float (&f)[8]) {
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int q = 0; q < 8; ++q) f[q] = Sixteen<T>::to_f(h[q]);
}

template <class T>
__global__ void __launch_bounds__(kThreadsL) lora_down_kernel(const T* __restrict__ x, const T* __restrict__ down_t,
                                                              float* __restrict__ lora_act, int M, int K, int R) {
  __shared__ __align__(16) float xs[kGroup][kXStride];   // [k][token]
  __shared__ float ds[kGroup][kDStride];                   // [k][rank]
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");   // as quant_act (the GEMM waits for us)
#endif
  const int m0 = blockIdx.x * kTokB, r0 = blockIdx.y * kRankB;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  // staging: x token tid / 8, k 8 (tid % 8) .. +7; lora_down_t k row tid / 4, ranks r0 + 8 (tid % 4) .. +7
  const int xt = tid / 8, xk = 8 * (tid % 8), dk = tid / 4, dr = 8 * (tid % 4);
  const bool xv = m0 + xt < M, dv = r0 + dr < R;   // R % 16 == 0: an 8-rank run is whole or absent
  const int G = K / kGroup;
  auto load = [&](int g, uint4& vx, uint4& vd) {
    vx = xv ? *reinterpret_cast<const uint4*>(x + static_cast<size_t>(m0 + xt) * K + g * kGroup + xk)
            : make_uint4(0, 0, 0, 0);
    vd = dv ? *reinterpret_cast<const uint4*>(down_t + static_cast<size_t>(g * kGroup + dk) * R + r0 + dr)
            : make_uint4(0, 0, 0, 0);
  };
  float acc[4] = {0.f, 0.f, 0.f, 0.f};   // tokens m0 + 4 warp + i, rank r0 + lane
  uint4 vx, vd;
  load(0, vx, vd);
  for (int g = 0; g < G; ++g) {
    float f[8];
    to_floats<T>(vx, f);
#pragma unroll
    for (int q = 0; q < 8; ++q) xs[xk + q][xt] = f[q];
    to_floats<T>(vd, f);
#pragma unroll
    for (int q = 0; q < 8; ++q) ds[dk][dr + q] = f[q];
    __syncthreads();
    if (g + 1 < G) load(g + 1, vx, vd);   // the next group's loads overlap this group's fmas
    float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 16
    for (int j = 0; j < kGroup; ++j) {   // k in order
      const float d = ds[j][lane];
      const float4 xx = *reinterpret_cast<const float4*>(&xs[j][4 * warp]);
      p[0] = __fmaf_rn(xx.x, d, p[0]);
      p[1] = __fmaf_rn(xx.y, d, p[1]);
      p[2] = __fmaf_rn(xx.z, d, p[2]);
      p[3] = __fmaf_rn(xx.w, d, p[3]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = __fadd_rn(acc[i], p[i]);
    __syncthreads();   // the stage is rewritten next group
  }
  if (r0 + lane >= R) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + 4 * warp + i;
    if (m < M) lora_act[static_cast<size_t>(m) * R + r0 + lane] = acc[i];
  }
}

}  // namespace

cudaError_t lora_down(const void* x, const void* lora_down_t, void* lora_act, int M, int K, int R, int dtype,
                      cudaStream_t stream) {
  if (M < 0 || K <= 0 || K % kGroup || R <= 0 || R % 16 || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  if (!x || !lora_down_t || !lora_act) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(lora_down_t)) & 15) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const dim3 grid((M + kTokB - 1) / kTokB, (R + kRankB - 1) / kRankB), block(kThreadsL);
  if (dtype == 0)
    lora_down_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x),
                                                          static_cast<const __half*>(lora_down_t),
                                                          static_cast<float*>(lora_act), M, K, R);
  else
    lora_down_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
                                                                 static_cast<const __nv_bfloat16*>(lora_down_t),
                                                                 static_cast<float*>(lora_act), M, K, R);
  return cudaGetLastError();
}

}  // namespace dcc_w4a4
