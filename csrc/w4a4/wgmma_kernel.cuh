// Device side of the Hopper W4A4 GEMM (included by gemm_wgmma.cu only, inside namespace dcc_w4a4 and its anonymous
// namespace; design and numerics at the top of gemm_wgmma.cu). One kernel template: T the 16-bit output type, kTok
// the token tile (the wgmma N: 64 or 128), kCvt how the group's sum becomes a float (all exact): 0, 1 on s8
// operands (int32 sums; I2F, or an integer add and an fp32 subtraction), 2 on e4m3 operands (fp32 sums).
#pragma once

#include <cuda.h>   // CUtensorMap

#include <type_traits>

template <int kTok_>
struct WgCfg {
  static constexpr int kTok = kTok_;
  static constexpr int kCh = 64;                       // channels per warpgroup tile (the wgmma M)
  static constexpr int kTileK = 128;                   // k per pipeline stage: two 64-k groups
  static constexpr int kStages = kTok == 128 ? 3 : 5;  // per ring (one ring per consumer warpgroup)
  static constexpr int kABytes = kCh * kTileK;         // weight codes [64 ch][128 k], 128B-swizzled
  static constexpr int kBBytes = kTok * kTileK;        // activation codes [kTok tokens][128 k], 128B-swizzled
  static constexpr int kWsOff = kABytes + kBBytes;     // wscales fp32 [2 groups][64 ch]
  static constexpr int kAsOff = kWsOff + 2 * kCh * 4;  // ascales fp32 [2 groups][kTok], tokens in tok_pos order
  static constexpr int kTxBytes = kAsOff + 2 * kTok * 4;
  static constexpr int kStageBytes = (kTxBytes + 1023) / 1024 * 1024;   // SW128 tiles need 1024-byte alignment
  static constexpr int kLaStride = kTok + 4;           // floats per rank row of the staged lora_act (16-byte rows)
  static constexpr int kUpStride = 36;                 // floats per channel row of the staged lora_up chunk: 16-byte
                                                       // rows, 8 lanes (channels g) on 8 distinct 4-bank groups
  static constexpr int kRank = 32;                     // ranks per epilogue chunk
  static constexpr int kOutStride = kCh + 8;           // 16-bit values per token row of the staged output
  static constexpr int kEpiBytes = kRank * kLaStride * 4 + kCh * kUpStride * 4;   // per warpgroup
  static constexpr int kSmemBytes = 1024 + 2 * kStages * kStageBytes + 2 * kEpiBytes + 2 * 2 * kStages * 8;
  static_assert(kTok * kOutStride * 2 <= kEpiBytes, "the output tile reuses the epilogue staging");
  static_assert(kSmemBytes <= 232448, "shared memory");
};
constexpr int kWgThreads = 384;   // 2 consumer warpgroups (one tile each) + 1 producer warpgroup

struct WgArgs {
  const void* bias;         // T [N] or null
  const float* lora_act;    // [M, R] or null
  const void* lora_up;      // T [N, R] or null
  void* out;                // T [M, N]
  int M, N, K, R;
  int num_m_tiles, num_tiles;
};

// Token order of the fp32 scale rows (ascales_t, written by quant_act) and of the staged lora_act: within each
// aligned 16-token block, token 16a + 8b + 2t + e sits at 16a + 4t + 2b + e, so that the four tokens of thread t's
// accumulator columns 8i + 2t + e (i = 2a, 2a + 1; e = 0, 1) are one 16-byte load. dcc/runtime/cuda/w4a4_ops.py
// (ascales_t, tok_pos) and quant_act.cu use the same map.
__host__ __device__ __forceinline__ int tok_pos(int m) {
  return (m & ~15) | ((m & 6) << 1) | ((m >> 2) & 2) | (m & 1);
}

#if defined(DCC_W4A4_WGMMA_DEVICE)
// float(psum), exact for |psum| < 2^22 (a group's |psum| <= 64 * 15 * 8 < 2^13): kCvt 0 = I2F (cvt.rn.f32.s32),
// 1 = the bits of 2^23 + 2^22 + psum (an integer add) minus 2^23 + 2^22 (an exact fp32 subtraction).
// kCvt 2: e4m3 operands, the accumulators already hold float(psum).
template <int kCvt>
__device__ __forceinline__ float psum_to_f(int v) {
  if constexpr (kCvt == 0) return __int2float_rn(v);
  else return __fsub_rn(__int_as_float(v + 0x4B400000), 12582912.f);
}
template <int kCvt>
__device__ __forceinline__ float psum_to_f(float v) { return v; }

// One 64-k group folded into the outputs: acc = fma(float(psum), fl32(ascale[m, g] * wscale[n, g]), acc)
// (csrc/w4a4/common.cuh group_step, the scales being the exact fp32 values of the 16-bit ones). w0, w1: the weight
// scales of this thread's channels (rows g, g + 8 of its warp's 16); as_t: the shared-memory address of the group's
// token scales at this thread's first column, tok_pos order, so columns 8i + 2t + e of i = 2 i2, 2 i2 + 1 are the
// 16-byte load at as_t + 64 i2.
template <int kTok, int kCvt, class Acc>
__device__ __forceinline__ void fold_group(float (&acc)[kTok / 2], const Acc (&isum)[kTok / 2], float w0, float w1,
                                           uint32_t as_t) {
#pragma unroll
  for (int i2 = 0; i2 < kTok / 16; ++i2) {
    const float4 a4 = sm90::lds_f32x4(as_t + 64 * i2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * i2 + h;
      const float a0 = h ? a4.z : a4.x, a1 = h ? a4.w : a4.y;
      acc[4 * i + 0] = __fmaf_rn(psum_to_f<kCvt>(isum[4 * i + 0]), __fmul_rn(a0, w0), acc[4 * i + 0]);
      acc[4 * i + 1] = __fmaf_rn(psum_to_f<kCvt>(isum[4 * i + 1]), __fmul_rn(a1, w0), acc[4 * i + 1]);
      acc[4 * i + 2] = __fmaf_rn(psum_to_f<kCvt>(isum[4 * i + 2]), __fmul_rn(a0, w1), acc[4 * i + 2]);
      acc[4 * i + 3] = __fmaf_rn(psum_to_f<kCvt>(isum[4 * i + 3]), __fmul_rn(a1, w1), acc[4 * i + 3]);
    }
  }
}

// Epilogue pieces shared by both kernels. acc = fl32(acc + bias[n]) for this thread's channels ch, ch + 8 (no bias:
// unchanged).
template <class T, int kTok>
__device__ __forceinline__ void add_bias(float (&acc)[kTok / 2], const T* bias, int ch) {
  if (!bias) return;
  const float b0 = Sixteen<T>::to_f(bias[ch]), b1 = Sixteen<T>::to_f(bias[ch + 8]);
#pragma unroll
  for (int i = 0; i < kTok / 8; ++i) {
    acc[4 * i + 0] = __fadd_rn(acc[4 * i + 0], b0);
    acc[4 * i + 1] = __fadd_rn(acc[4 * i + 1], b0);
    acc[4 * i + 2] = __fadd_rn(acc[4 * i + 2], b1);
    acc[4 * i + 3] = __fadd_rn(acc[4 * i + 3], b1);
  }
}

// A warpgroup's 64-channel x kTok-token tile: one RNE to 16 bits into the staging out_s [kTok][kOutStride] (rows
// row0, row0 + 8 of this thread), then 16-byte stores to out[m0 + tok][n0 .. n0 + 63] (tokens >= M dropped). Named
// barrier `bar` (128 threads): before, the staging is free (the caller's previous reads of it are done); between, it
// is whole.
template <class T, int kTok, int kOutStride>
__device__ __forceinline__ void store_tile(const float (&acc)[kTok / 2], T* out_s, T* out, int row0, int t, int tid,
                                           int bar, int m0, int n0, int M, int N) {
  sm90::named_bar_sync(bar, 128);
#pragma unroll
  for (int i = 0; i < kTok / 8; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = 8 * i + 2 * t + e;
      out_s[tok * kOutStride + row0] = Sixteen<T>::from_f(acc[4 * i + e]);
      out_s[tok * kOutStride + row0 + 8] = Sixteen<T>::from_f(acc[4 * i + 2 + e]);
    }
  sm90::named_bar_sync(bar, 128);
  for (int e = tid; e < kTok * 8; e += 128) {   // 8 chunks of 16 bytes (64 channels) per token row
    const int tok = e / 8, c = e % 8;
    if (m0 + tok < M)
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(m0 + tok) * N + n0 + 8 * c) =
          *reinterpret_cast<const uint4*>(out_s + tok * kOutStride + 8 * c);
  }
}
#endif

template <class T, int kTok, int kCvt>
__global__ void __launch_bounds__(kWgThreads, 1) w4a4_wgmma_kernel(const __grid_constant__ CUtensorMap tm_w,
                                                                   const __grid_constant__ CUtensorMap tm_a,
                                                                   const __grid_constant__ CUtensorMap tm_ws,
                                                                   const __grid_constant__ CUtensorMap tm_as,
                                                                   const WgArgs p) {
#if defined(DCC_W4A4_WGMMA_DEVICE)
  using namespace sm90;
  using C = WgCfg<kTok>;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kAcc = kTok / 2;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* epi_base = smem + 2 * kStages * kStageBytes;
  const uint32_t bars = smem_addr(epi_base + 2 * C::kEpiBytes);   // full[2][kStages], then empty[2][kStages]
  auto full_bar = [&](int ring, int s) { return bars + 8 * (ring * kStages + s); };
  auto empty_bar = [&](int ring, int s) { return bars + 8 * (2 * kStages + ring * kStages + s); };

  if (threadIdx.x == 0) {
    for (int r = 0; r < 2; ++r)
      for (int s = 0; s < kStages; ++s) {
        mbar_init(full_bar(r, s), 1);
        mbar_init(empty_bar(r, s), 4);   // one arrive per consumer warp of the ring's warpgroup
      }
    fence_barrier_init();
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int KT = p.K / C::kTileK;
  const int wg_stride = 2 * gridDim.x;
  if (warp >= 8) {
    // ---------------- producer: lane 0 of warp 8 + r fills ring r (the tiles of consumer warpgroup r) ----------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp < 10 && lane == 0) {
      const int ring = warp - 8;
      const uint32_t ring0 = smem_addr(smem + ring * kStages * kStageBytes);
      // Programmatic dependent launch: the weights and their scales do not depend on the kernel before this one
      // (quant_act), so the first tile's first ring of them is requested before waiting for it; the activation
      // codes and scales (its outputs) after.
      const int first = blockIdx.x + ring * gridDim.x;
      const int pre = first < p.num_tiles ? min(kStages, KT) : 0;
      for (int s = 0; s < pre; ++s) {   // a fresh ring: every slot is free
        const uint32_t full = full_bar(ring, s), st = ring0 + s * kStageBytes;
        mbar_arrive_expect_tx(full, C::kTxBytes);
        tma_load_2d(st, &tm_w, s * C::kTileK, (first / p.num_m_tiles) * C::kCh, full);
        tma_load_2d(st + C::kWsOff, &tm_ws, (first / p.num_m_tiles) * C::kCh, 2 * s, full);
      }
      grid_dependency_wait();
      for (int s = 0; s < pre; ++s) {
        const uint32_t full = full_bar(ring, s), st = ring0 + s * kStageBytes;
        tma_load_2d(st + C::kABytes, &tm_a, s * C::kTileK, (first % p.num_m_tiles) * kTok, full);
        tma_load_2d(st + C::kAsOff, &tm_as, (first % p.num_m_tiles) * kTok, 2 * s, full);
      }
      int it = 0;
      for (int tile = first; tile < p.num_tiles; tile += wg_stride) {
        const int m0 = (tile % p.num_m_tiles) * kTok, n0 = (tile / p.num_m_tiles) * C::kCh;
        for (int kt = 0; kt < KT; ++kt, ++it) {
          if (it < pre) continue;   // requested above
          const int s = it % kStages;
          mbar_wait(empty_bar(ring, s), ((it / kStages) & 1) ^ 1);
          const uint32_t full = full_bar(ring, s), st = ring0 + s * kStageBytes;
          mbar_arrive_expect_tx(full, C::kTxBytes);
          tma_load_2d(st, &tm_w, kt * C::kTileK, n0, full);
          tma_load_2d(st + C::kABytes, &tm_a, kt * C::kTileK, m0, full);
          tma_load_2d(st + C::kWsOff, &tm_ws, n0, 2 * kt, full);
          tma_load_2d(st + C::kAsOff, &tm_as, m0, 2 * kt, full);
        }
      }
    }
    return;
  }

  // ---------------- consumers: warpgroup wg takes tiles blockIdx.x + wg * gridDim.x, then every 2 * gridDim.x ---
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  grid_dependency_wait();   // lora_act (the previous kernel's output) is read, and the output written, after it
  const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const uint32_t ring0 = smem_addr(smem + wg * kStages * kStageBytes);
  uint8_t* epi = epi_base + wg * C::kEpiBytes;
  float* la_s = reinterpret_cast<float*>(epi);                       // [kRank][kLaStride]
  float* up_s = la_s + C::kRank * C::kLaStride;                      // [64 ch][kUpStride]
  T* out_s = reinterpret_cast<T*>(epi);                              // [kTok][kOutStride] (after the low rank)
  const int row0 = 16 * wq + g;                                      // this thread's channels: row0, row0 + 8
  const T* bias = static_cast<const T*>(p.bias);
  const T* up = static_cast<const T*>(p.lora_up);
  T* out = static_cast<T*>(p.out);
  int it = 0;
  std::conditional_t<kCvt == 2, float, int> isum[kAcc];   // the group's sums
  float acc[kAcc];

  for (int tile = blockIdx.x + wg * gridDim.x; tile < p.num_tiles; tile += wg_stride) {
    const int m0 = (tile % p.num_m_tiles) * kTok, n0 = (tile / p.num_m_tiles) * C::kCh;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;   // +0: the emulation's start

    for (int kt = 0; kt < KT; ++kt, ++it) {
      const int s = it % kStages;
      mbar_wait(full_bar(wg, s), (it / kStages) & 1);
      const uint32_t st = ring0 + s * kStageBytes;
      const uint64_t da = desc_sw128(st), db = desc_sw128(st + C::kABytes);
#pragma unroll
      for (int j = 0; j < 2; ++j) {   // the stage's two 64-k groups, in k order
        // psum of group 2kt + j: two k32 wgmmas, the first overwriting the accumulators (scale-d = 0)
        wgmma_fence();
        wgmma_tile<kTok, 0>(isum, da + 4 * j, db + 4 * j);
        wgmma_tile<kTok, 1>(isum, da + 4 * j + 2, db + 4 * j + 2);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(isum);
        const float w0 = lds_f32(st + C::kWsOff + (j * C::kCh + row0) * 4);
        const float w1 = lds_f32(st + C::kWsOff + (j * C::kCh + row0 + 8) * 4);
        fold_group<kTok, kCvt>(acc, isum, w0, w1, st + C::kAsOff + (j * kTok + 4 * t) * 4);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar(wg, s));   // this warp has read the stage (wgmmas retired, scales read)
    }

    // ---------------- epilogue: bias, low rank (fma chain over r in order), one rounding, 16-byte stores -------
    add_bias<T, kTok>(acc, bias, n0 + row0);
    const int R = p.R;
    for (int r0 = 0; r0 < R; r0 += C::kRank) {
      const int rc = min(C::kRank, R - r0);
      named_bar_sync(1 + wg, 128);   // the previous chunk (or tile's output) is no longer read
#pragma unroll 8
      for (int e = tid; e < kTok * C::kRank; e += 128) {   // lora_act rows: 32 consecutive floats per token
        const int tok = e / C::kRank, r = e % C::kRank;
        la_s[r * C::kLaStride + tok_pos(tok)] =
            r < rc && m0 + tok < p.M ? p.lora_act[static_cast<size_t>(m0 + tok) * R + r0 + r] : 0.f;
      }
#pragma unroll 8
      for (int e = tid; e < C::kCh * C::kRank; e += 128) {
        const int ch = e / C::kRank, r = e % C::kRank;
        up_s[ch * C::kUpStride + r] = r < rc ? Sixteen<T>::to_f(up[static_cast<size_t>(n0 + ch) * R + r0 + r]) : 0.f;
      }
      named_bar_sync(1 + wg, 128);
      const uint32_t la0 = smem_addr(la_s) + (4 * t) * 4;
      const uint32_t up0 = smem_addr(up_s) + row0 * C::kUpStride * 4, up1 = up0 + 8 * C::kUpStride * 4;
      for (int r4 = 0; r4 < rc; r4 += 4) {   // rc is a multiple of 16
        const float4 u0v = lds_f32x4(up0 + r4 * 4), u1v = lds_f32x4(up1 + r4 * 4);
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {   // ranks in order
          const float u0 = rr == 0 ? u0v.x : rr == 1 ? u0v.y : rr == 2 ? u0v.z : u0v.w;
          const float u1 = rr == 0 ? u1v.x : rr == 1 ? u1v.y : rr == 2 ? u1v.z : u1v.w;
#pragma unroll
          for (int i2 = 0; i2 < kTok / 16; ++i2) {
            const float4 a4 = lds_f32x4(la0 + ((r4 + rr) * C::kLaStride + 16 * i2) * 4);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int i = 2 * i2 + h;
              const float a0 = h ? a4.z : a4.x, a1 = h ? a4.w : a4.y;
              acc[4 * i + 0] = __fmaf_rn(a0, u0, acc[4 * i + 0]);
              acc[4 * i + 1] = __fmaf_rn(a1, u0, acc[4 * i + 1]);
              acc[4 * i + 2] = __fmaf_rn(a0, u1, acc[4 * i + 2]);
              acc[4 * i + 3] = __fmaf_rn(a1, u1, acc[4 * i + 3]);
            }
          }
        }
      }
    }
    // the staging area is free once the low-rank reads and the previous tile's stores are done
    store_tile<T, kTok, C::kOutStride>(acc, out_s, out, row0, t, tid, 1 + wg, m0, n0, p.M, p.N);
  }
#endif
}
