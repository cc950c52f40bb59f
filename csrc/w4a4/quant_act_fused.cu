// W4A4 activation kernel for Nunchaku INT4, fused: in one pass over x, for a block of 16 tokens, the 4-bit codes and
// 16-bit scales (and the optional fp32 group-major copy ascales_t, and e4m3 codes) of quant_act.cu, and the low-rank
// down-projection lora_act, with no global workspace. The bits are quant_act.cu's (DESIGN.md "Numerics";
// dcc/targets/nunchaku/cuda_numerics.py lora_down_act, dcc/ir/w4a4.py quantize_act_int4):
//   v = x; unsigned: v = 16-bit(fl32(v + shift)); smooth: v = 16-bit(fl32(v * rs[k])), rs[k] = __frcp_rn(smooth[k])
//   per token and 64-k group: amax = max |v| (fmaxf: NaN ignored, any order exact); scale = fl32(amax * fl32(1/7))
//   (1/15 unsigned), stored as its 16-bit RNE; rscale = scale < FLT_MIN ? +inf : __frcp_rn(scale);
//   code = NaN -> 0, else clamp(rint(fl32(v * rscale)), -8, 7) ([0, 15] unsigned)
//   lora_act[m, r] = ((+0 + p_0) + p_1) + ... in group order (__fadd_rn), p_g = the __fmaf_rn chain from +0 over the
//   group's 64 k in k order of x[m, k] * down_t[k, r] (raw x: no shift, no smoothing; both widened exactly to fp32).
// Layout: a CTA (128 threads) takes 16 tokens and one chunk of Rc ranks (16, 32 or 64; R / Rc CTAs per token block,
// the first of them also quantizes) and walks the groups in stages of P groups (256 k; 128 k for Rc = 64):
//   cp.async (16 bytes) of the stage's x [16 x 64P] (two buffers: issued a stage ahead) and down_t [64P x Rc]
//   (issued while the previous stage's fmas run) into shared memory; then a convert phase: 16 lanes per (token,
//   group), 4 k each: amax by shuffles within the 16 lanes, codes stored 4 bytes a lane, x widened to fp32
//   [token][k] and down_t to fp32 [k][rank];
//   then the fma phase: one group per 32 or 64 threads, each thread 4 ranks x TT tokens (TT = 4; 2 for Rc = 16),
//   16-byte shared loads, 16 (8) chains; the chains' group sums go to shared memory and the owner of each
//   (token, 4 ranks) adds them to its fp32 accumulator in group order. The chains are the same fmas in the same
//   order as quant_act's, so the bits are the same whatever the blocking.
#include <atomic>
#include <cfloat>
#include <cstdint>

#include <cuda_fp8.h>

#include "common.cuh"

namespace dcc_w4a4 {
namespace {

constexpr int kTok = 16;    // tokens per CTA
constexpr int kThr = 128;   // threads per CTA

template <int Rc>
struct Cfg {
  static constexpr int P = Rc == 64 ? 2 : 4;                // groups per stage
  static constexpr int kStage = P * kGroup;                 // k per stage
  static constexpr int TT = Rc == 16 ? 2 : 4;               // tokens per thread in the fma phase
  static constexpr int TA = kTok / TT;                      // a thread's tokens: a + TA * i
  static constexpr int RQ = Rc / 4;                         // rank quads of the chunk
  static constexpr int LPG = TA * RQ;                       // threads per group in the fma phase
  static constexpr int XS = kStage + 4;                     // fp32 x row stride (floats): rows shifted 4 banks
  static constexpr int OWN = Rc ? (kTok * RQ + kThr - 1) / kThr : 0;   // float4 accumulators per thread
  static constexpr int SM = (kStage + kThr - 1) / kThr;     // smooth values per thread per stage
  // shared memory (bytes): raw x [2][16][kStage] 16-bit (two stages), 1/smooth [kStage], x fp32 [16][XS], raw
  // down_t [kStage][Rc] 16-bit, down_t fp32 [kStage][Rc], group sums [P][16][Rc]
  static constexpr int XR = kTok * kStage;                  // raw x values per buffer
  static constexpr int oRs = 2 * XR * 2, oXf = oRs + kStage * 4, oDr = oXf + (Rc ? kTok * XS * 4 : 0);
  static constexpr int oDf = oDr + kStage * Rc * 2, oPb = oDf + kStage * Rc * 4, bytes = oPb + P * kTok * Rc * 4;
  static_assert(Rc == 0 || P * LPG == kThr, "the fma phase takes every thread");
};

__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {   // zero-fill when !valid
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ float comp(const float4& v, int i) {   // a component, i a compile-time constant
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <class T, int Rc>
__global__ void __launch_bounds__(kThr) quant_act_fused_kernel(
    const T* __restrict__ x, const T* __restrict__ smooth, const T* __restrict__ down_t, uint8_t* __restrict__ codes,
    T* __restrict__ ascales, float* __restrict__ lora_act, int M, int K, int R, int nchunks, bool is_unsigned,
    float shift, float* __restrict__ ascales_t, int ld, bool fp8_codes) {
  using C = Cfg<Rc>;
  constexpr int P = C::P, kStage = C::kStage;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xr = reinterpret_cast<T*>(smem);
  float* rs = reinterpret_cast<float*>(smem + C::oRs);
  float* xf = reinterpret_cast<float*>(smem + C::oXf);
  T* dr = reinterpret_cast<T*>(smem + C::oDr);
  float* df = reinterpret_cast<float*>(smem + C::oDf);
  float* pb = reinterpret_cast<float*>(smem + C::oPb);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // as quant_act's kernel: the dependent grid (the wgmma GEMM) may start and prefetch weights; it waits for this
  // grid's completion (griddepcontrol.wait) before reading what this grid writes
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const int tid = threadIdx.x;
  const int chunk = static_cast<int>(blockIdx.x % nchunks), m0 = static_cast<int>(blockIdx.x / nchunks) * kTok;
  const int rc0 = chunk * Rc, G = K / kGroup, S = (G + P - 1) / P;
  const bool quant = chunk == 0, smoothing = smooth != nullptr && quant;
  const float qrecip = is_unsigned ? 1.0f / 15.0f : 1.0f / 7.0f;   // the compile-time fp32 RNE of 1/qmax
  const float lo = is_unsigned ? 0.f : -8.f, hi = is_unsigned ? 15.f : 7.f;

  // the stage's x (tokens past M: zeros; buffer s % 2) and down_t chunk, 16 bytes a copy
  auto issue_x = [&](int s) {
    const int k0 = s * kStage, xc = min(P, G - s * P) * (kGroup / 8);
    T* dst = xr + (s & 1) * C::XR;
    for (int c = tid; c < kTok * xc; c += kThr) {
      const int t = c / xc, w = c - t * xc, m = m0 + t;
      cp16(dst + t * kStage + 8 * w, x + static_cast<size_t>(min(m, M - 1)) * K + k0 + 8 * w, m < M);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  auto issue_d = [&](int s) {
    if constexpr (Rc > 0) {
      const int k0 = s * kStage, nj = min(P, G - s * P);
      for (int c = tid; c < nj * kGroup * (Rc / 8); c += kThr) {
        const int row = c / (Rc / 8), w = c - row * (Rc / 8);
        cp16(dr + row * Rc + 8 * w, down_t + static_cast<size_t>(k0 + row) * R + rc0 + 8 * w, true);
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
  };
  float smv[C::SM];   // the next stage's smooth values, loaded before the fma phase, inverted after it
  auto smooth_load = [&](int s) {
#pragma unroll
    for (int u = 0; u < C::SM; ++u) {
      const int c = tid + u * kThr;
      smv[u] = s * kStage + c < K && c < kStage ? ld16f(smooth + s * kStage + c) : 1.f;
    }
  };
  auto smooth_store = [&] {
#pragma unroll
    for (int u = 0; u < C::SM; ++u)
      if (tid + u * kThr < kStage) rs[tid + u * kThr] = __frcp_rn(smv[u]);   // dcc's model of __fdividef
  };
  float4 acc[C::OWN > 0 ? C::OWN : 1];   // lora_act of (token o / RQ, ranks 4 (o % RQ) ..), o = tid + kThr u
#pragma unroll
  for (int u = 0; u < C::OWN; ++u) acc[u] = make_float4(0.f, 0.f, 0.f, 0.f);
  auto reduce = [&](int nj) {   // the stage's group sums, in group order
#pragma unroll
    for (int u = 0; u < C::OWN; ++u) {
      const int o = tid + u * kThr;
      if (o >= kTok * C::RQ) continue;
      for (int j = 0; j < nj; ++j) {
        const float4 p = *reinterpret_cast<const float4*>(pb + j * kTok * Rc + 4 * o);
        acc[u] = make_float4(__fadd_rn(acc[u].x, p.x), __fadd_rn(acc[u].y, p.y), __fadd_rn(acc[u].z, p.z),
                             __fadd_rn(acc[u].w, p.w));
      }
    }
  };

  issue_x(0);
  issue_d(0);
  if (smoothing) {
    smooth_load(0);
    smooth_store();
  }
  for (int s = 0; s < S; ++s) {
    const int nj = min(P, G - s * P), k0 = s * kStage;
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();   // the stage's copies and 1/smooth are in; the previous stage's fmas are done
    if (s + 1 < S) issue_x(s + 1);   // into the buffer the previous stage's convert phase has left
    if (s > 0) reduce(P);
    const T* xs = xr + (s & 1) * C::XR;
    // convert phase. x: half-warp h takes (token t, group j), lane q the k 4q .. 4q + 3 of it (16 * nj tasks, a
    // whole number of rounds of 8 half-warps: every lane of a warp takes part in every shuffle)
#pragma unroll 2
    for (int h = tid / 16; h < kTok * nj; h += kThr / 16) {
      const int t = h / nj, j = h - t * nj, q = tid % 16, kk = j * kGroup + 4 * q;
      const uint2 u = *reinterpret_cast<const uint2*>(xs + t * kStage + kk);
      const T* hv = reinterpret_cast<const T*>(&u);
      if constexpr (Rc > 0)
        *reinterpret_cast<float4*>(xf + t * C::XS + kk) = make_float4(
            Sixteen<T>::to_f(hv[0]), Sixteen<T>::to_f(hv[1]), Sixteen<T>::to_f(hv[2]), Sixteen<T>::to_f(hv[3]));
      if (!quant) continue;
      float v[4];
      const float4 r4 = smoothing ? *reinterpret_cast<const float4*>(rs + kk) : make_float4(1.f, 1.f, 1.f, 1.f);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T qv = hv[i];
        if (shift != 0.f) qv = Sixteen<T>::from_f(__fadd_rn(Sixteen<T>::to_f(qv), shift));
        if (smoothing) qv = Sixteen<T>::from_f(__fmul_rn(Sixteen<T>::to_f(qv), comp(r4, i)));
        v[i] = Sixteen<T>::to_f(qv);
      }
      float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float scale = __fmul_rn(amax, qrecip);
      const float rscale = scale < FLT_MIN ? __int_as_float(0x7f800000) : __frcp_rn(scale);
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = __fmul_rn(v[i], rscale);
        // + 0: a code of -0 (rintf of a small negative p) becomes +0, the e4m3 byte of the integer 0 (0x00, not 0x80)
        const float c = (isnan(p) ? 0.f : fminf(fmaxf(rintf(p), lo), hi)) + 0.f;
        // fp8_codes: the e4m3 byte of the integer code (exact: |code| <= 15)
        const uint32_t b = fp8_codes ? static_cast<uint32_t>(__nv_cvt_float_to_fp8(c, __NV_SATFINITE, __NV_E4M3))
                                     : static_cast<uint32_t>(static_cast<int>(c)) & 0xFFu;
        word |= b << (8 * i);
      }
      const int m = m0 + t;
      if (m >= M) continue;
      *reinterpret_cast<uint32_t*>(codes + static_cast<size_t>(m) * K + k0 + kk) = word;
      if (q == 0) {
        const int g = s * P + j;
        const T s16 = Sixteen<T>::from_f(scale);
        ascales[static_cast<size_t>(m) * G + g] = s16;
        if (ascales_t)   // token m at column tok_pos(m) (w4a4.h)
          ascales_t[static_cast<size_t>(g) * ld + ((m & ~15) | ((m & 6) << 1) | ((m >> 2) & 2) | (m & 1))] =
              Sixteen<T>::to_f(s16);
      }
    }
    if constexpr (Rc > 0)   // down_t widened to fp32, 4 ranks a step
      for (int c = tid; c < nj * kGroup * C::RQ; c += kThr) {
        const uint2 u = *reinterpret_cast<const uint2*>(dr + 4 * c);
        const T* hv = reinterpret_cast<const T*>(&u);
        *reinterpret_cast<float4*>(df + 4 * c) = make_float4(Sixteen<T>::to_f(hv[0]), Sixteen<T>::to_f(hv[1]),
                                                             Sixteen<T>::to_f(hv[2]), Sixteen<T>::to_f(hv[3]));
      }
    __syncthreads();   // the stage is converted; raw down_t and 1/smooth are free
    if (s + 1 < S) {
      issue_d(s + 1);
      if (smoothing) smooth_load(s + 1);
    }
    if constexpr (Rc > 0) {   // fma phase: group j of the stage, tokens a + TA i, ranks 4b .. 4b + 3 of the chunk
      const int j = tid / C::LPG, a = tid % C::LPG % C::TA, b = tid % C::LPG / C::TA;
      if (j < nj) {
        float p[C::TT][4];
#pragma unroll
        for (int i = 0; i < C::TT; ++i) p[i][0] = p[i][1] = p[i][2] = p[i][3] = 0.f;
        const float* xp = xf + a * C::XS + j * kGroup;
        const float* dp = df + j * kGroup * Rc + 4 * b;
        float4 xv[2][C::TT], dv[2][4];   // k 4 k4 .. 4 k4 + 3, loaded one step ahead
        auto load = [&](int k4, float4(&xq)[C::TT], float4(&dq)[4]) {
#pragma unroll
          for (int i = 0; i < C::TT; ++i) xq[i] = *reinterpret_cast<const float4*>(xp + i * C::TA * C::XS + 4 * k4);
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[e] = *reinterpret_cast<const float4*>(dp + (4 * k4 + e) * Rc);
        };
        load(0, xv[0], dv[0]);
#pragma unroll
        for (int k4 = 0; k4 < kGroup / 4; ++k4) {
          if (k4 + 1 < kGroup / 4) load(k4 + 1, xv[(k4 + 1) & 1], dv[(k4 + 1) & 1]);
          const float4(&xc)[C::TT] = xv[k4 & 1];
          const float4(&dc)[4] = dv[k4 & 1];
#pragma unroll
          for (int e = 0; e < 4; ++e)   // k = 4 k4 + e, in order
#pragma unroll
            for (int i = 0; i < C::TT; ++i) {
              const float xe = comp(xc[i], e);
              p[i][0] = __fmaf_rn(xe, dc[e].x, p[i][0]);
              p[i][1] = __fmaf_rn(xe, dc[e].y, p[i][1]);
              p[i][2] = __fmaf_rn(xe, dc[e].z, p[i][2]);
              p[i][3] = __fmaf_rn(xe, dc[e].w, p[i][3]);
            }
        }
#pragma unroll
        for (int i = 0; i < C::TT; ++i)
          *reinterpret_cast<float4*>(pb + j * kTok * Rc + (a + C::TA * i) * Rc + 4 * b) =
              make_float4(p[i][0], p[i][1], p[i][2], p[i][3]);
      }
    }
    if (smoothing && s + 1 < S) smooth_store();
  }
  if constexpr (Rc > 0) {
    __syncthreads();
    reduce(G - (S - 1) * P);
#pragma unroll
    for (int u = 0; u < C::OWN; ++u) {
      const int o = tid + u * kThr, t = o / C::RQ, m = m0 + t;
      if (o < kTok * C::RQ && m < M)
        *reinterpret_cast<float4*>(lora_act + static_cast<size_t>(m) * R + rc0 + 4 * (o % C::RQ)) = acc[u];
    }
  }
}

template <class T, int Rc>
cudaError_t launch_fused(const void* x, const void* smooth, const void* down_t, void* codes, void* ascales,
                         void* lora_act, int M, int K, int R, bool is_unsigned, float shift, float* ascales_t, int ld,
                         bool fp8_codes, cudaStream_t stream) {
  auto kern = quant_act_fused_kernel<T, Rc>;
  constexpr int bytes = Cfg<Rc>::bytes;
  static std::atomic<uint64_t> configured{0};   // per device: above 48 KB of shared memory needs the opt-in
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (!bit || !(configured.load() & bit)) {
    if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)) != cudaSuccess ||
        (e = cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  cudaSharedmemCarveoutMaxShared)) != cudaSuccess)
      return e;
    configured.fetch_or(bit);
  }
  const int nchunks = Rc ? R / Rc : 1;
  const unsigned blocks = static_cast<unsigned>((M + kTok - 1) / kTok) * static_cast<unsigned>(nchunks);
  kern<<<blocks, kThr, bytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(smooth),
                                        static_cast<const T*>(down_t), static_cast<uint8_t*>(codes),
                                        static_cast<T*>(ascales), static_cast<float*>(lora_act), M, K, R, nchunks,
                                        is_unsigned, shift, ascales_t, ld, fp8_codes);
  return cudaGetLastError();
}

// the widest rank chunk that divides R (the chunks of a token block run side by side: x is read again from L2)
template <class T>
cudaError_t launch_rank(const void* x, const void* smooth, const void* down_t, void* codes, void* ascales,
                        void* lora_act, int M, int K, int R, bool is_unsigned, float shift, float* ascales_t, int ld,
                        bool fp8_codes, cudaStream_t stream) {
  const auto f = R == 0 ? launch_fused<T, 0> : R % 64 == 0 ? launch_fused<T, 64>
               : R % 32 == 0 ? launch_fused<T, 32> : launch_fused<T, 16>;
  return f(x, smooth, down_t, codes, ascales, lora_act, M, K, R, is_unsigned, shift, ascales_t, ld, fp8_codes, stream);
}

}  // namespace

// quant_act's INT4 case (w4a4.h) without the workspace; x, lora_down_t (R > 0) and lora_act 16-byte aligned, codes
// 4-byte aligned (quant_act.cu checks this and falls back to its own kernel otherwise).
cudaError_t quant_act_fused(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                            void* lora_act, int M, int K, int R, int dtype, int is_unsigned, float shift,
                            cudaStream_t stream, void* ascales_t, int ld, int fp8_codes) {
  if (M < 0 || K <= 0 || K % kGroup || R < 0 || R % 16 || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  if (ascales_t && (ld < M || ld % 16)) return cudaErrorInvalidValue;
  if (!x || !codes || !ascales || (R > 0 && (!lora_down_t || !lora_act))) return cudaErrorInvalidValue;
  const uintptr_t al = reinterpret_cast<uintptr_t>(x) |
                       (R > 0 ? reinterpret_cast<uintptr_t>(lora_down_t) | reinterpret_cast<uintptr_t>(lora_act) : 0);
  if (al % 16 || reinterpret_cast<uintptr_t>(codes) % 4) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  auto st = static_cast<float*>(ascales_t);
  if (dtype == 0)
    return launch_rank<__half>(x, smooth, lora_down_t, codes, ascales, lora_act, M, K, R, is_unsigned != 0, shift,
                               st, ld, fp8_codes != 0, stream);
  return launch_rank<__nv_bfloat16>(x, smooth, lora_down_t, codes, ascales, lora_act, M, K, R, is_unsigned != 0,
                                    shift, st, ld, fp8_codes != 0, stream);
}

}  // namespace dcc_w4a4
