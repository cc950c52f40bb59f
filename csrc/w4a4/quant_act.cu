// W4A4 activation kernel (Nunchaku INT4 and NVFP4, research/targets.md 3A), bit-identical to dcc/ir/w4a4.py
// quantize_act_int4 / quantize_act_nvfp4 for codes and scales. One CTA per token, one warp per 64-k chunk (two values
// per lane):
//   v = x (16-bit); unsigned INT4 layers: v = 16-bit(v + shift)   (fp32 add, one RNE: innocuous double rounding)
//   smooth: v = 16-bit(fl32(v * fl32(1 / smooth[k])))               (dcc's model of __fdividef: RN reciprocal)
//   INT4, per 64 k: amax = max |v| (exact), scale = fl32(amax * fl32(1/7)) (1/15 unsigned); stored ascale = 16-bit
//     RNE of scale; rscale = scale < FLT_MIN ? +inf : fl32(1 / scale) (rcp.approx.ftz modelled as RN with ftz);
//     code = NaN -> 0, else clamp(rint(fl32(v * rscale)), -8, 7) ([0, 15] unsigned; rint = half to even)
//   NVFP4, per 16 k: scale = fminf(fl32(amax * fl32(1/6)), 448); stored micro-scale = e4m3 RNE of it (a byte);
//     code = e2m1 RNE (satfinite, sign kept, NaN -> +0) of fl32(v * rscale), as its bit pattern
// and the low-rank down-projection of the raw x (no shift, no smoothing): per 64-k chunk and rank r the partial
// p = fma chain over the chunk's 64 k in order from +0, written to the workspace; then lora_act[m, r] = the fp32 sum
// of the partials in chunk order from +0 (dcc/targets/nunchaku/cuda_numerics.py: lora_down_act).
// With DCC_W4A4_QUANT=fused the INT4 case runs on quant_act_fused.cu (one pass over x for 16 tokens, no workspace,
// the same bits; opt-in until its GPU tests have run); this kernel is the default, NVFP4's, and unaligned pointers'.
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_fp8.h>

#include "common.cuh"

namespace dcc_w4a4 {

// quant_act_fused.cu: the INT4 case in one pass over x, lora_act included, no workspace (the same bits); x,
// lora_down_t (R > 0) and lora_act 16-byte aligned, codes 4-byte aligned.
cudaError_t quant_act_fused(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                            void* lora_act, int M, int K, int R, int dtype, int is_unsigned, float shift,
                            cudaStream_t stream, void* ascales_t, int ld, int fp8_codes);

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// e4m3 (fn) round-to-nearest-even of s in [0, 448] (finite, non-negative: the clamped micro-scale), as its byte.
__device__ __forceinline__ uint32_t e4m3_rne(float s) {
  if (!(s > 0.f)) return 0u;
  const int e = max(ilogbf(s), -6);                  // below 2^-6 the spacing stays 2^-9 (subnormals)
  const float r = ldexpf(rintf(ldexpf(s, 3 - e)), e - 3);   // power-of-two scaling is exact; rint: half to even
  if (r < 0.015625f) return static_cast<uint32_t>(ldexpf(r, 9));   // subnormal: m * 2^-9, exponent field 0
  const int er = ilogbf(r);
  return static_cast<uint32_t>(((er + 7) << 3) | (static_cast<int>(ldexpf(r, 3 - er)) - 8));
}

// e2m1 round-to-nearest-even, saturating at 6, as the bit pattern sign << 3 | magnitude index (values 0, .5, 1,
// 1.5, 2, 3, 4, 6; ties go to the even index); NaN -> +0 (code 0).
__device__ __forceinline__ uint32_t e2m1_rne(float y) {
  if (isnan(y)) return 0u;
  const float a = fabsf(y);
  const uint32_t mag = a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
                     : a <= 2.5f ? 4u : a < 3.5f ? 5u : a <= 5.f ? 6u : 7u;
  return mag | (signbit(y) ? 8u : 0u);
}

template <class T, bool kFp4>
__global__ void __launch_bounds__(kThreads) quant_act_kernel(const T* __restrict__ x, const T* __restrict__ smooth,
                                                             const T* __restrict__ down_t, uint8_t* __restrict__ codes,
                                                             void* __restrict__ ascales, float* __restrict__ lora_act,
                                                             float* __restrict__ ws, int K, int R, bool is_unsigned,
                                                             float shift, float* __restrict__ ascales_t, int ld,
                                                             bool fp8_codes) {
  __shared__ float xs[kWarps][kGroup];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the dependent grid (the wgmma GEMM, launched programmatically) start once every CTA of this grid has
  // started: it prefetches weights, and waits for this grid's completion (griddepcontrol.wait) before reading
  // what this grid writes. This kernel itself is launched plainly (it waits for its predecessor in full).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const int m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = K / kGroup;
  const T* row = x + static_cast<size_t>(m) * K;
  // the compile-time fp32 RNE of 1/qmax
  const float qrecip = kFp4 ? 1.0f / 6.0f : is_unsigned ? 1.0f / 15.0f : 1.0f / 7.0f;
  const float lo = is_unsigned ? 0.f : -8.f, hi = is_unsigned ? 15.f : 7.f;
  for (int g = warp; g < G; g += kWarps) {
    const int k = g * kGroup + 2 * lane;
    float raw[2], v[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const T xv = row[k + i];
      raw[i] = Sixteen<T>::to_f(xv);
      T q = xv;
      if (shift != 0.f) q = Sixteen<T>::from_f(__fadd_rn(Sixteen<T>::to_f(q), shift));
      if (smooth) q = Sixteen<T>::from_f(__fmul_rn(Sixteen<T>::to_f(q), __frcp_rn(ld16f(smooth + k + i))));
      v[i] = Sixteen<T>::to_f(q);
    }
    // amax over the group: 32 lanes (INT4, 64 k) or the 8 lanes of one 16-k group (NVFP4)
    float amax = fmaxf(fabsf(v[0]), fabsf(v[1]));
#pragma unroll
    for (int o = kFp4 ? 4 : 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float scale = __fmul_rn(amax, qrecip);
    if (kFp4) scale = fminf(scale, 448.f);
    const float rscale = scale < FLT_MIN ? __int_as_float(0x7f800000) : __frcp_rn(scale);
    uint32_t c[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float p = __fmul_rn(v[i], rscale);
      if (kFp4) {
        c[i] = e2m1_rne(p);
      } else {
        // + 0: a code of -0 (rintf of a small negative p) becomes +0, the e4m3 byte of the integer 0 (0x00, not 0x80)
        const float q = (isnan(p) ? 0.f : fminf(fmaxf(rintf(p), lo), hi)) + 0.f;
        // fp8_codes: the e4m3 byte of the integer code (exact: |code| <= 15 needs 4 significant bits)
        c[i] = fp8_codes ? static_cast<uint32_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3))
                         : static_cast<uint32_t>(static_cast<int>(q)) & 0xFFu;
      }
    }
    *reinterpret_cast<uint16_t*>(codes + static_cast<size_t>(m) * K + k) = static_cast<uint16_t>(c[0] | (c[1] << 8));
    if (kFp4) {
      if (lane % 8 == 0)
        static_cast<uint8_t*>(ascales)[static_cast<size_t>(m) * (K / 16) + g * 4 + lane / 8] =
            static_cast<uint8_t>(e4m3_rne(scale));
    } else if (lane == 0) {
      const T s16 = Sixteen<T>::from_f(scale);
      static_cast<T*>(ascales)[static_cast<size_t>(m) * G + g] = s16;
      // gemm_wgmma's copy: the stored 16-bit scale as fp32 (exact), group-major
      // (token m at column tok_pos(m): within a 16-token block 16a + 8b + 2t + e -> 16a + 4t + 2b + e)
      if (ascales_t)
        ascales_t[static_cast<size_t>(g) * ld + ((m & ~15) | ((m & 6) << 1) | ((m >> 2) & 2) | (m & 1))] =
            Sixteen<T>::to_f(s16);
    }
    if (R > 0) {
      xs[warp][2 * lane] = raw[0];
      xs[warp][2 * lane + 1] = raw[1];
      __syncwarp();
      for (int r = lane; r < R; r += 32) {
        const T* d = down_t + static_cast<size_t>(g) * kGroup * R + r;
        float p = 0.f;
#pragma unroll 8
        for (int j = 0; j < kGroup; ++j) p = __fmaf_rn(xs[warp][j], ld16f(d + static_cast<size_t>(j) * R), p);
        ws[(static_cast<size_t>(m) * G + g) * R + r] = p;
      }
      __syncwarp();   // xs is rewritten by this warp's next chunk
    }
  }
  if (R == 0) return;
  __syncthreads();   // the partials of every chunk of this token are written (global writes of this CTA)
  for (int r = threadIdx.x; r < R; r += kThreads) {
    const float* p = ws + static_cast<size_t>(m) * G * R + r;
    float acc = 0.f;
    for (int g = 0; g < G; ++g) acc = __fadd_rn(acc, p[static_cast<size_t>(g) * R]);
    lora_act[static_cast<size_t>(m) * R + r] = acc;
  }
}

template <bool kFp4>
cudaError_t launch(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                   void* lora_act, void* workspace, size_t ws_bytes, int M, int K, int R, int dtype, int is_unsigned,
                   float shift, cudaStream_t stream, void* ascales_t = nullptr, int ld = 0, int fp8_codes = 0) {
  if (M < 0 || K <= 0 || K % kGroup || R < 0 || R % 16 || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  if (ascales_t && (ld < M || ld % 16)) return cudaErrorInvalidValue;
  if ((ascales_t || fp8_codes) && kFp4) return cudaErrorInvalidValue;
  if (!x || !codes || !ascales) return cudaErrorInvalidValue;
  if (R > 0 && (!lora_down_t || !lora_act)) return cudaErrorInvalidValue;
  // DCC_W4A4_LORA_DOWN=blocked: the low-rank down-projection by the token-blocked kernel (lora_down.cu, the same
  // bits), after this one, which then skips it
  const char* ld_mode = R > 0 ? std::getenv("DCC_W4A4_LORA_DOWN") : nullptr;
  const bool blocked = ld_mode != nullptr && std::strcmp(ld_mode, "blocked") == 0 &&
                       (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(lora_down_t)) % 16 == 0;
  // INT4: the fused kernel (quant_act_fused.cu, the same bits, no workspace) where the pointers are aligned for it
  // and its 16-token blocks cover the SMs, M >= 16 x SMs (H100: M = 4096 90-96 us against 172-179 at K = 3072, 356
  // against 1068 at K = 12288; at M = 1024, 64 blocks, 82-86 against 49-51). DCC_W4A4_QUANT=fused / old (read per
  // call) forces one kernel.
  if (!kFp4 && !blocked) {
    const char* q_mode = std::getenv("DCC_W4A4_QUANT");
    const uintptr_t al = reinterpret_cast<uintptr_t>(x) |
                         (R > 0 ? reinterpret_cast<uintptr_t>(lora_down_t) | reinterpret_cast<uintptr_t>(lora_act) : 0);
    bool want = q_mode != nullptr && std::strcmp(q_mode, "fused") == 0;
    if (q_mode == nullptr) {
      const int sms = device_attr(cudaDevAttrMultiProcessorCount);
      want = M >= 16 * (sms > 0 ? sms : 132);
    }
    if (want && al % 16 == 0 && reinterpret_cast<uintptr_t>(codes) % 4 == 0)
      return quant_act_fused(x, smooth, lora_down_t, codes, ascales, lora_act, M, K, R, dtype, is_unsigned, shift,
                             stream, ascales_t, ld, fp8_codes);
  }
  if (R > 0 && (!workspace || ws_bytes < quant_act_workspace(M, K, R))) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int R_here = blocked ? 0 : R;
  const dim3 grid(M), block(kThreads);
  auto cd = static_cast<uint8_t*>(codes);
  auto la = static_cast<float*>(lora_act);
  auto wsp = static_cast<float*>(workspace);
  if (dtype == 0) {
    using T = __half;
    quant_act_kernel<T, kFp4><<<grid, block, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(smooth), static_cast<const T*>(lora_down_t), cd, ascales,
        la, wsp, K, R_here, is_unsigned != 0, shift, static_cast<float*>(ascales_t), ld, fp8_codes != 0);
  } else {
    using T = __nv_bfloat16;
    quant_act_kernel<T, kFp4><<<grid, block, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(smooth), static_cast<const T*>(lora_down_t), cd, ascales,
        la, wsp, K, R_here, is_unsigned != 0, shift, static_cast<float*>(ascales_t), ld, fp8_codes != 0);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !blocked) return e;
  return lora_down(x, lora_down_t, lora_act, M, K, R, dtype, stream);
}

}  // namespace

size_t quant_act_workspace(int M, int K, int R) {
  if (M <= 0 || K <= 0 || R <= 0) return 0;
  return static_cast<size_t>(M) * (K / kGroup) * R * sizeof(float);
}

cudaError_t quant_act(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                      void* lora_act, void* workspace, size_t ws_bytes, int M, int K, int R, int dtype,
                      int is_unsigned, float shift, cudaStream_t stream, void* ascales_t, int ld, int fp8_codes) {
  return launch<false>(x, smooth, lora_down_t, codes, ascales, lora_act, workspace, ws_bytes, M, K, R, dtype,
                       is_unsigned, shift, stream, ascales_t, ld, fp8_codes);
}

cudaError_t quant_act_nvfp4(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                            void* lora_act, void* workspace, size_t ws_bytes, int M, int K, int R, int dtype,
                            cudaStream_t stream) {
  return launch<true>(x, smooth, lora_down_t, codes, ascales, lora_act, workspace, ws_bytes, M, K, R, dtype, 0, 0.f,
                      stream);
}

}  // namespace dcc_w4a4
