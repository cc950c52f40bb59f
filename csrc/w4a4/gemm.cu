// W4A4 GEMM, correctness-first version: mma.sync on 4-bit codes widened to one byte each, any sm_80+ GPU. CTA tile
// 64 tokens x 64 channels, 4 warps of 32 x 32, 64 k per step (synchronous 16-byte loads into padded shared memory, no
// pipeline). Numerics (csrc/w4a4/DESIGN.md), per output (m, n):
//   INT4 (m16n8k32, one 64-k group per step): acc = +0; for each group g in k order: psum = the exact int32 sum of
//     the group's 64 code products; acc = fma(float(psum), fl32(ascale[m,g] * wscale[n,g]), acc)
//   NVFP4 (m16n8k16, four 16-k groups per step; e2m1 values doubled to the integers 0..12): for each 16-k group in k
//     order, acc = fma(float(psum2), fl32(ascale * wscale) / 4, acc) (e4m3 products and the / 4 are exact); then
//     acc = fl32(acc * alpha), and fl32(acc * wcscale[n]) where given
//   bias: acc = fl32(acc + bias[n]); low rank: for r in 0..R-1 in order, acc = fma(lora_act[m,r], up[n,r], acc)
//   out = 16-bit RNE of acc.
// A faster kernel that replaces this one keeps exactly these steps (integer partial sums per group are exact in any
// order; the fp32 steps are per output and in a fixed order).
#include <cstdint>

#include "common.cuh"

namespace dcc_w4a4 {
namespace {

constexpr int BM = 64, BN = 64, kThreads = 128;
constexpr int kStride = kGroup + 16;   // bytes per staged row: 80 = 20 words, the 8 fragment rows hit 8 bank groups
constexpr int kRankChunk = 32;         // ranks staged per epilogue pass
constexpr int kSub = 4;                // NVFP4: 16-k micro-groups per 64-k step

template <class T>
struct Params {
  const uint8_t* acodes;   // INT4: int8 codes; NVFP4: e2m1 patterns
  const void* ascales;     // INT4: T [M, K/64]; NVFP4: e4m3 bytes [M, K/16]
  const uint8_t* wcodes;
  const void* wscales;
  const T* wcscales;       // NVFP4 only, may be null
  const T* bias;
  const float* lora_act;
  const T* lora_up;
  T* out;
  float alpha;
  int M, N, K, R;
};

// d += a (16x16 s8, row) * b (16x8 s8, col), s32 accumulate: a0 = row g, k 4t..4t+3; a1 = row g+8; b0 = k 4t..,
// column g.
__device__ __forceinline__ void mma_s8_k16(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// Four e2m1 bit patterns (one a byte) -> four int8 of twice their value: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 become
// 0, 1, 2, 3, 4, 6, 8, 12 (exact integers, so the mma's int32 sums are exact); the sign bit negates (-0 -> 0).
__device__ __forceinline__ uint32_t e2m1x4_doubled(uint32_t w) {
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t c = (w >> (8 * i)) & 0xFu;
    const int mag = static_cast<int>(__byte_perm(0x03020100u, 0x0C080604u, c & 7u) & 0xFFu);
    out |= (static_cast<uint32_t>(c & 8u ? -mag : mag) & 0xFFu) << (8 * i);
  }
  return out;
}

__device__ __forceinline__ uint4 e2m1x16_doubled(uint4 v) {
  return make_uint4(e2m1x4_doubled(v.x), e2m1x4_doubled(v.y), e2m1x4_doubled(v.z), e2m1x4_doubled(v.w));
}

// An e4m3 (fn) byte as float (exact; 0x7F / 0xFF, the NaN patterns, never occur in scales).
__device__ __forceinline__ float e4m3_to_f(uint32_t b) {
  const int e = static_cast<int>((b >> 3) & 0xFu), m = static_cast<int>(b & 7u);
  const float v = e == 0 ? ldexpf(static_cast<float>(m), -9) : ldexpf(static_cast<float>(8 + m), e - 10);
  return b & 0x80u ? -v : v;
}

template <class T, bool kFp4>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const Params<T> p) {
  __shared__ __align__(16) uint8_t As[BM * kStride];
  __shared__ __align__(16) uint8_t Bs[BN * kStride];
  __shared__ float as_s[BM][kFp4 ? kSub : 1], ws_s[BN][kFp4 ? kSub : 1];
  __shared__ float la_s[BM][kRankChunk + 1], up_s[BN][kRankChunk + 1];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int wm = warp / 2, wn = warp % 2;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int M = p.M, N = p.N, K = p.K, R = p.R;
  const int G = K / kGroup;                    // 64-k steps
  const int GS = kFp4 ? K / 16 : G;            // scales per row

  float acc[2][4][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.f;

  for (int g = 0; g < G; ++g) {
    // stage the step: 64 rows x 64 bytes of each operand (4 chunks of 16 bytes per row), rows past M / N as zeros
    for (int c = threadIdx.x; c < BM * 4; c += kThreads) {
      const int r = c / 4, q = c % 4;
      const int kofs = g * kGroup + q * 16;
      uint4 va = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
      if (m0 + r < M) va = *reinterpret_cast<const uint4*>(p.acodes + static_cast<size_t>(m0 + r) * K + kofs);
      if (n0 + r < N) vb = *reinterpret_cast<const uint4*>(p.wcodes + static_cast<size_t>(n0 + r) * K + kofs);
      if (kFp4) {
        va = e2m1x16_doubled(va);
        vb = e2m1x16_doubled(vb);
      }
      *reinterpret_cast<uint4*>(As + r * kStride + q * 16) = va;
      *reinterpret_cast<uint4*>(Bs + r * kStride + q * 16) = vb;
    }
    for (int e = threadIdx.x; e < BM * (kFp4 ? kSub : 1); e += kThreads) {
      const int r = e / (kFp4 ? kSub : 1), q = e % (kFp4 ? kSub : 1);
      const size_t arow = static_cast<size_t>(m0 + r) * GS, wrow = static_cast<size_t>(n0 + r) * GS;
      if (kFp4) {
        const size_t col = static_cast<size_t>(g) * kSub + q;
        const uint8_t* as8 = static_cast<const uint8_t*>(p.ascales);
        const uint8_t* ws8 = static_cast<const uint8_t*>(p.wscales);
        as_s[r][q] = m0 + r < M ? e4m3_to_f(as8[arow + col]) : 0.f;
        ws_s[r][q] = n0 + r < N ? e4m3_to_f(ws8[wrow + col]) : 0.f;
      } else {
        as_s[r][0] = m0 + r < M ? ld16f(static_cast<const T*>(p.ascales) + arow + g) : 0.f;
        ws_s[r][0] = n0 + r < N ? ld16f(static_cast<const T*>(p.wscales) + wrow + g) : 0.f;
      }
    }
    __syncthreads();

    constexpr int kSteps = kFp4 ? kSub : 1;   // folds per 64-k step
#pragma unroll
    for (int sub = 0; sub < kSteps; ++sub) {
      int ip[2][4][4];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) ip[a][b][i] = 0;
      if (kFp4) {
        const int kk = sub * 16;
        uint32_t a0[2], a1[2];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const uint8_t* base = As + (wm * 32 + a * 16 + gq) * kStride + kk + 4 * tq;
          a0[a] = *reinterpret_cast<const uint32_t*>(base);                   // row g,   k 4t..4t+3
          a1[a] = *reinterpret_cast<const uint32_t*>(base + 8 * kStride);     // row g+8
        }
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(Bs + (wn * 32 + b * 8 + gq) * kStride + kk + 4 * tq);
#pragma unroll
          for (int a = 0; a < 2; ++a) mma_s8_k16(ip[a][b], a0[a], a1[a], b0);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kGroup; kk += 32) {
          uint32_t af[2][4];
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            const uint8_t* base = As + (wm * 32 + a * 16 + gq) * kStride + kk + 4 * tq;
            af[a][0] = *reinterpret_cast<const uint32_t*>(base);                     // row g,   k 4t..4t+3
            af[a][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kStride);       // row g+8, k 4t..
            af[a][2] = *reinterpret_cast<const uint32_t*>(base + 16);                // row g,   k 16+4t..
            af[a][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kStride + 16);  // row g+8, k 16+4t..
          }
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const uint8_t* base = Bs + (wn * 32 + b * 8 + gq) * kStride + kk + 4 * tq;
            const uint32_t b0 = *reinterpret_cast<const uint32_t*>(base);            // column g, k 4t..4t+3
            const uint32_t b1 = *reinterpret_cast<const uint32_t*>(base + 16);       // column g, k 16+4t..
#pragma unroll
            for (int a = 0; a < 2; ++a) mma_s8(ip[a][b], af[a], b0, b1);
          }
        }
      }
      // c0, c1: row g, columns 2t, 2t+1; c2, c3: row g+8
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int ml = wm * 32 + a * 16 + gq + 8 * (i / 2), nl = wn * 32 + b * 8 + 2 * tq + (i % 2);
            if (kFp4) {   // the e4m3 product and the / 4 of the doubled values are exact
              const float s = __fmul_rn(__fmul_rn(as_s[ml][sub], ws_s[nl][sub]), 0.25f);
              acc[a][b][i] = __fmaf_rn(__int2float_rn(ip[a][b][i]), s, acc[a][b][i]);
            } else {
              acc[a][b][i] = group_step(ip[a][b][i], as_s[ml][0], ws_s[nl][0], acc[a][b][i]);
            }
          }
    }
    __syncthreads();   // the stage is rewritten by the next step
  }

#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = n0 + wn * 32 + b * 8 + 2 * tq + i;
      const bool nv = n < N;
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& v = acc[a][b][i + 2 * h];
          if (kFp4) {
            v = __fmul_rn(v, p.alpha);
            if (p.wcscales) v = __fmul_rn(v, nv ? ld16f(p.wcscales + n) : 0.f);
          }
          if (p.bias) v = __fadd_rn(v, nv ? ld16f(p.bias + n) : 0.f);
        }
    }

  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    const int rc = min(kRankChunk, R - r0);
    for (int e = threadIdx.x; e < BM * kRankChunk; e += kThreads) {
      const int row = e / kRankChunk, r = e % kRankChunk;
      const bool rv = r < rc;
      la_s[row][r] = rv && m0 + row < M ? p.lora_act[static_cast<size_t>(m0 + row) * R + r0 + r] : 0.f;
      up_s[row][r] = rv && n0 + row < N ? ld16f(p.lora_up + static_cast<size_t>(n0 + row) * R + r0 + r) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int ml = wm * 32 + a * 16 + gq + 8 * (i / 2), nl = wn * 32 + b * 8 + 2 * tq + (i % 2);
          float v = acc[a][b][i];
          for (int r = 0; r < rc; ++r) v = __fmaf_rn(la_s[ml][r], up_s[nl][r], v);
          acc[a][b][i] = v;
        }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + wm * 32 + a * 16 + gq + 8 * (i / 2), n = n0 + wn * 32 + b * 8 + 2 * tq + (i % 2);
        if (m < M && n < N) p.out[static_cast<size_t>(m) * N + n] = Sixteen<T>::from_f(acc[a][b][i]);
      }
}

template <bool kFp4>
cudaError_t launch(const void* acodes, const void* ascales, const void* wcodes, const void* wscales, float alpha,
                   const void* wcscales, const void* bias, const void* lora_act, const void* lora_up, void* out,
                   int M, int N, int K, int R, int dtype, cudaStream_t stream) {
  if (M < 0 || N <= 0 || K <= 0 || K % kGroup || R < 0 || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  if (!acodes || !ascales || !wcodes || !wscales || !out) return cudaErrorInvalidValue;
  if (R > 0 && (!lora_act || !lora_up)) return cudaErrorInvalidValue;
  // 16-byte code rows: K % 64 == 0 keeps every row aligned if the base is
  if (reinterpret_cast<uintptr_t>(acodes) % 16 || reinterpret_cast<uintptr_t>(wcodes) % 16)
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM), block(kThreads);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Params<T> p{static_cast<const uint8_t*>(acodes), ascales, static_cast<const uint8_t*>(wcodes), wscales,
                static_cast<const T*>(wcscales), static_cast<const T*>(bias), static_cast<const float*>(lora_act),
                static_cast<const T*>(lora_up), static_cast<T*>(out), alpha, M, N, K, R};
    gemm_kernel<T, kFp4><<<grid, block, 0, stream>>>(p);
  };
  if (dtype == 0) run(__half());
  else run(__nv_bfloat16());
  return cudaGetLastError();
}

}  // namespace

cudaError_t gemm(const void* acodes, const void* ascales, const void* wcodes, const void* wscales, const void* bias,
                 const void* lora_act, const void* lora_up, void* out, int M, int N, int K, int R, int dtype,
                 cudaStream_t stream) {
  return launch<false>(acodes, ascales, wcodes, wscales, 1.f, nullptr, bias, lora_act, lora_up, out, M, N, K, R,
                       dtype, stream);
}

cudaError_t gemm_nvfp4(const void* acodes, const void* ascales, const void* wcodes, const void* wscales, float alpha,
                       const void* wcscales, const void* bias, const void* lora_act, const void* lora_up, void* out,
                       int M, int N, int K, int R, int dtype, cudaStream_t stream) {
  return launch<true>(acodes, ascales, wcodes, wscales, alpha, wcscales, bias, lora_act, lora_up, out, M, N, K, R,
                      dtype, stream);
}

}  // namespace dcc_w4a4
