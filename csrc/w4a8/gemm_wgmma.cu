// Hopper (sm_90a) W4A8 GEMM on wgmma for QServe-layout weights (research/targets.md 1A).
//
// Design ("swap AB"): the kernel computes out^T = W . X^T, so the weights are the wgmma A operand (from registers)
// and the int8 activations the B operand (from shared memory).
//  - A lane's 16 bytes of a 32(n) x 32(k) qweight tile (512 contiguous bytes) are, after splitting the nibbles
//    (x & 0x0F0F0F0F: rows 0-15 of the tile, (x >> 4) & 0x0F0F0F0F: rows 16-31), exactly the per-warp A fragment of
//    wgmma m64nNk32.s8 (warp w of the warpgroup supplies rows 16w..16w+15). Warp w of a consumer warpgroup takes the
//    32-channel tile 32w..32w+31 of the warpgroup's 128 channels; per k32 step the warpgroup issues two
//    m64n128k32 wgmmas, one on the low-nibble slabs (channels 32w + 0..15) and one on the high (32w + 16..31). The
//    row -> channel permutation is undone in the epilogue.
//  - CTA tile: 256 channels (2 consumer warpgroups x 128) x 128 tokens, k stage 128. One producer warp (lane 0)
//    fills a 4-stage shared-memory ring guarded by mbarriers: the activation tile [128 tokens][128 k] by a 2D TMA
//    load with 128-byte swizzle (the wgmma B layout: K-major, SW128), the weight tiles by 8 bulk copies of 2 KB
//    (each 32-channel block's four 32x32 tiles of the stage are contiguous), and for groups the stage's s2 rows
//    (2 x 256 bytes per group). Consumers read their 16 bytes per k32 step with one ld.shared.v4.
//  - Grouped (progressive, G = 64 or 128): w8 = q*s2 + z2 with z2 = -z*s2 (int8). w8 + 128 = q*s2 + (z2 + 128)
//    lies in [0, 255] for every byte, so one 32-bit multiply-add on 4 packed bytes has no carries, and XOR 0x80 per
//    byte gives the int8 (csrc/w4a8/common.cuh, Level2). The s2 word of lane g holds channels g, g+8, g+16, g+24
//    of the 32-channel block (QServe's [4,8] -> [8,4] reorder), i.e. rows g, g+8 (low) and g+16, g+24 (high).
//  - Pipelining: per k32 step: wgmma.fence, 2 wgmmas, commit, then ld.shared + unpack of the next step's weights
//    (overlapping the running wgmmas), then wait_group 1 (the previous step retired: its A registers are free and,
//    at a stage's first step, the previous stage is released to the producer). Persistent grid (one CTA per SM,
//    tiles strided by the grid, m fastest): the producer prefetches the next tile's stages during the epilogue.
//    Consumers get 232 registers (setmaxnreg), the producer warpgroup 40.
//  - Numerics: psum is the exact int32 sum (s8 x s8 -> s32 tensor-core accumulation). Epilogue per output:
//    a = s1[n]*ascale[m] and b = szeros[n]*asum[m] are exact in float (products of two fp16); for |psum| < 2^22
//    psum is exact in float (magic-number conversion), so fmaf(psum, a, -b) is the exact result rounded once to
//    float, then rounded to fp16. The reference chain (mma.sync kernels in common.cuh, the CPU reference) rounds
//    the exact value to double, then float, then fp16: identical except where the double rounding lands on a
//    float tie (probability ~2^-29 per output; never seen). Larger |psum| takes the double path (exact_out), which
//    is that reference chain; DCC_WGMMA_EPI=0 builds the double path for every output (same speed on the H100).
//    Outputs go through shared memory for 16-byte coalesced stores; tokens >= M are masked (the TMA load fills
//    rows past M with zeros).
//  - Split-K (few output tiles, e.g. M = 128): S CTAs per output tile (grid.y) each write their int32 partials in
//    fragment order (coalesced 16-byte stores) to a workspace slot; the last to arrive (an arrival counter, reset
//    by it) adds the others' slots (integer: order-independent) and runs the epilogue. S is the largest power of
//    two <= 8 with tiles * S <= SMs and >= 8 k stages per split; without workspace the call runs unsplit.
// Requirements (gemm_wgmma_supported): sm_90a device code present, N % 256 == 0, K % 128 == 0, group 0/64/128;
// any M >= 1. Env (benchmarks only): DCC_W4A8_WGMMA_SPLITS forces S, DCC_W4A8_WGMMA_PERSISTENT=0 one CTA per tile.
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include <cuda.h>   // CUtensorMap and the cuTensorMapEncodeTiled prototype only; resolved at run time
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w4a8.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "wgmma_ptx.cuh"
#define DCC_WGMMA_DEVICE 1
#endif

namespace dcc_w4a8 {
namespace {

constexpr int kTileN = 256;        // output channels per CTA (2 consumer warpgroups x 128)
constexpr int kTileM = 128;        // tokens per CTA (wgmma N)
constexpr int kTileK = 128;        // k per pipeline stage
constexpr int kStages = 4;
constexpr int kThreads = 384;      // 2 consumer warpgroups + 1 producer warpgroup (one thread issues the copies)
constexpr int kActBytes = kTileM * kTileK;            // 16 KB, 128B-swizzled [128 tokens][128 k]
constexpr int kWBytes = kTileN * kTileK / 2;          // 16 KB: [8 channel blocks][4 k tiles][512 B]
constexpr int kS2Bytes = 2 * 2 * kTileN;              // up to 2 groups x (scales, zeros) x 256 channels
constexpr int kStageBytes = kActBytes + kWBytes + 2048;   // 34816 = 34 x 1024 (keeps every stage 1024-aligned)
constexpr int kEpiStride = 128 + 8;                   // halves per token row of a warpgroup's output tile
constexpr int kEpiBytes = 2 * kTileM * kEpiStride * 2;    // both warpgroups
constexpr int kScaleBytes = 2 * 2 * kTileM * (8 + 4);     // per warpgroup: ascale, asum as double and float
constexpr int kBarBytes = 2 * kStages * 8 + 16;
constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kEpiBytes + kScaleBytes + kBarBytes;
static_assert(kS2Bytes <= 2048, "s2 region");
static_assert(kSmemBytes <= 232448, "shared memory");

struct WgParams {
  const uint8_t* qweight;
  const __half* ascale;
  const __half* asum;
  const __half* s1;
  const __half* szeros;
  const uint8_t* s2s;
  const uint8_t* s2z;
  __half* out;
  int32_t* partial;     // split-K: int32 [M_pad][N] accumulators (zero between calls)
  uint32_t* counters;   // split-K: one per output tile (zero between calls)
  int M, N, K;
  int num_m_tiles;
  int splits;           // K splits (1: no split)
};

#if defined(DCC_WGMMA_DEVICE)
using namespace wgk;

template <int kGroup>
__device__ __forceinline__ void unpack(const uint4 w, uint32_t s2w, uint32_t z2w, uint32_t (&lo)[4],
                                       uint32_t (&hi)[4]) {
  const uint32_t r[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo[i] = r[i] & 0x0F0F0F0Fu;
    hi[i] = (r[i] >> 4) & 0x0F0F0F0Fu;
  }
  if constexpr (kGroup > 0) {
    const uint32_t zoff = z2w ^ 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = i & 1;   // a0/a2: row g (byte 0, high: byte 2); a1/a3: row g+8 (byte 1, high: byte 3)
      const uint32_t sl = (s2w >> (8 * j)) & 0xFFu, sh = (s2w >> (8 * (j + 2))) & 0xFFu;
      const uint32_t cl = __byte_perm(zoff, 0, 0x1111u * j), ch = __byte_perm(zoff, 0, 0x1111u * (j + 2));
      lo[i] = (lo[i] * sl + cl) ^ 0x80808080u;
      hi[i] = (hi[i] * sh + ch) ^ 0x80808080u;
    }
  }
}
#endif

#if defined(DCC_WGMMA_DEVICE)
// Exact epilogue value rounded as the reference does: fp16(float(double(psum*s1*as - sz*asum))). s1d/szd: channel
// scales, asd/amd: token scale and sum, all exact doubles of fp16 values. psum*s1*as is exact in double (<= 47
// significant bits) and the fma rounds once. int32 -> double by the 2^52 magic number (no I2F.F64).
template <int kGroup>
__device__ __forceinline__ __half exact_out(int psum, double s1d, double szd, double asd, double amd) {
  const double pd = __hiloint2double(0x43300000, psum ^ 0x80000000) - 4503601774854144.0;   // 2^52 + 2^31
  double v = (pd * s1d) * asd;
  if (kGroup == 0) v = fma(-szd, amd, v);
  return __float2half_rn(__double2float_rn(v));
}

#endif

#ifndef DCC_WGMMA_PIPE
#define DCC_WGMMA_PIPE 1
#endif
#ifndef DCC_WGMMA_EPI
#define DCC_WGMMA_EPI 1
#endif

template <int kGroup>
__global__ void __launch_bounds__(kThreads, 1) w4a8_wgmma_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const WgParams p) {
#if defined(DCC_WGMMA_DEVICE)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stages = smem;
  __half* epi = reinterpret_cast<__half*>(smem + kStages * kStageBytes);
  double* scl = reinterpret_cast<double*>(smem + kStages * kStageBytes + kEpiBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + kEpiBytes + kScaleBytes);
  __shared__ int s_last;
  const uint32_t full0 = smem_addr(bars), empty0 = smem_addr(bars + kStages);

  const int num_tiles = p.num_m_tiles * (p.N / kTileN);
  const int split = blockIdx.y;
  const int KT = p.K / kTileK / p.splits;   // stages of one tile (this split)
  const int kt0 = split * KT;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);   // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= 8) {
    // ---------------- producer: one thread streams every tile's stages through the ring ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      constexpr int gps = kGroup == 0 ? 0 : kTileK / kGroup;   // groups per stage
      constexpr uint32_t bytes = kActBytes + kWBytes + gps * 2 * kTileN;
      const size_t kblocks = static_cast<size_t>(p.K / 32);
      int g_it = 0;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const int m0 = (tile % p.num_m_tiles) * kTileM, n0 = (tile / p.num_m_tiles) * kTileN;
        for (int it = 0; it < KT; ++it, ++g_it) {
          const int s = g_it % kStages;
          mbar_wait(empty0 + 8 * s, ((g_it / kStages) & 1) ^ 1);
          const uint32_t full = full0 + 8 * s;
          mbar_arrive_expect_tx(full, bytes);
          const uint32_t st = smem_addr(stages + s * kStageBytes);
          const int kt = kt0 + it;
          tma_load_2d(st, &tmap, kt * kTileK, m0, full);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const uint8_t* src = p.qweight + ((static_cast<size_t>(n0 / 32 + i) * kblocks) + kt * 4) * 512;
            bulk_load(st + kActBytes + i * 2048, src, 2048, full);
          }
#pragma unroll
          for (int gi = 0; gi < gps; ++gi) {
            const size_t row = static_cast<size_t>(kt * kTileK / (kGroup > 0 ? kGroup : 1) + gi) * p.N + n0;
            bulk_load(st + kActBytes + kWBytes + gi * 512, p.s2s + row, kTileN, full);
            bulk_load(st + kActBytes + kWBytes + gi * 512 + 256, p.s2z + row, kTileN, full);
          }
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp / 4, wq = warp % 4;
  const int g = lane / 4, t = lane % 4;
  const int tid = threadIdx.x % 128;
  const int bar_id = 1 + wg;
  const uint32_t stage0 = smem_addr(stages);
  const uint32_t w_off = kActBytes + (wg * 4 + wq) * 2048 + lane * 16;
  const uint32_t s2_off = kActBytes + kWBytes + (wg * 128 + wq * 32 + 4 * g);
  // channels of this thread within the warpgroup's 128: lo rows g, g+8 -> 32wq + g (+8); hi -> 32wq + 16 + g (+8)
  const int cbase = 32 * wq + g;
  double* asd = scl + wg * 2 * kTileM;   // token scale / sum as double (exact path) ...
  double* amd = asd + kTileM;
  float* asf = reinterpret_cast<float*>(scl + 4 * kTileM) + wg * 2 * kTileM;   // ... and as float
  float* amf = asf + kTileM;
  __half* T = epi + wg * kTileM * kEpiStride;
  int g_it = 0;

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int m0 = (tile % p.num_m_tiles) * kTileM, n0 = (tile / p.num_m_tiles) * kTileN;
    const int nbase = n0 + wg * 128;
    int acc_lo[64], acc_hi[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_lo[i] = acc_hi[i] = 0;

    for (int it = 0; it < KT; ++it, ++g_it) {
      const int s = g_it % kStages;
      mbar_wait(full0 + 8 * s, (g_it / kStages) & 1);
      const uint32_t st = stage0 + s * kStageBytes;
      const uint64_t desc = desc_sw128(st);
      uint32_t s2w[2] = {0, 0}, z2w[2] = {0, 0};
      if constexpr (kGroup > 0) {
#pragma unroll
        for (int gi = 0; gi < kTileK / kGroup; ++gi) {
          s2w[gi] = lds32(st + s2_off + gi * 512);
          z2w[gi] = lds32(st + s2_off + gi * 512 + 256);
        }
      }
#if DCC_WGMMA_PIPE == 1
      // Software pipeline over the stage's four k32 steps: the next step's weights are loaded and unpacked while
      // this step's wgmmas run; wait_group 1 then retires the previous step (its A registers become free).
      uint32_t lo[4], hi[4];
      unpack<kGroup>(lds128(st + w_off), s2w[0], z2w[0], lo, hi);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wgmma_fence();
        wgmma_m64n128k32_s8(acc_lo, lo, desc + (j * 32 >> 4));
        wgmma_m64n128k32_s8(acc_hi, hi, desc + (j * 32 >> 4));
        wgmma_commit();
        if (j < 3) {
          const int gi = kGroup > 0 ? ((j + 1) * 32) / (kGroup > 0 ? kGroup : 128) : 0;
          unpack<kGroup>(lds128(st + w_off + (j + 1) * 512), s2w[gi], z2w[gi], lo, hi);
        }
        wgmma_wait<1>();
        if (j == 0 && it > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));
      }
    }
#else
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint4 w = lds128(st + w_off + j * 512);
        uint32_t lo[4], hi[4];
        const int gi = kGroup > 0 ? (j * 32) / (kGroup > 0 ? kGroup : 128) : 0;
        unpack<kGroup>(w, s2w[gi], z2w[gi], lo, hi);
        wgmma_fence();
        wgmma_m64n128k32_s8(acc_lo, lo, desc + (j * 32 >> 4));
        wgmma_m64n128k32_s8(acc_hi, hi, desc + (j * 32 >> 4));
        wgmma_commit();
        wgmma_wait<1>();
        if (j == 0 && it > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));
      }
    }
#endif
    wgmma_wait<0>();
    if (lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));   // the tile's last stage

    if (p.splits > 1) {
      // int32 partials of this split, in fragment order (coalesced 16-byte stores); the last CTA of the tile to
      // arrive adds the other splits' partials (integer: any order gives the same sum) and runs the epilogue.
      const int ctid = threadIdx.x;   // 0..255
      int4* base = reinterpret_cast<int4*>(p.partial) + static_cast<size_t>(tile) * p.splits * 256 * 32;
      int4* mine = base + static_cast<size_t>(split) * 256 * 32;
#pragma unroll
      for (int v = 0; v < 16; ++v) {
        __stcg(mine + v * 256 + ctid, make_int4(acc_lo[4 * v], acc_lo[4 * v + 1], acc_lo[4 * v + 2], acc_lo[4 * v + 3]));
        __stcg(mine + (16 + v) * 256 + ctid,
               make_int4(acc_hi[4 * v], acc_hi[4 * v + 1], acc_hi[4 * v + 2], acc_hi[4 * v + 3]));
      }
      __threadfence();
      named_bar_sync(3, 256);
      if (threadIdx.x == 0) {
        const uint32_t prev = atomicAdd(p.counters + tile, 1u);
        s_last = prev == static_cast<uint32_t>(p.splits - 1);
        if (s_last) p.counters[tile] = 0;   // ready for the next call
      }
      named_bar_sync(3, 256);
      if (!s_last) continue;
      __threadfence();
      for (int z = 0; z < p.splits; ++z) {
        if (z == split) continue;
        const int4* other = base + static_cast<size_t>(z) * 256 * 32;
#pragma unroll
        for (int v = 0; v < 16; ++v) {
          const int4 a = __ldcg(other + v * 256 + ctid), b = __ldcg(other + (16 + v) * 256 + ctid);
          acc_lo[4 * v] += a.x; acc_lo[4 * v + 1] += a.y; acc_lo[4 * v + 2] += a.z; acc_lo[4 * v + 3] += a.w;
          acc_hi[4 * v] += b.x; acc_hi[4 * v + 1] += b.y; acc_hi[4 * v + 2] += b.z; acc_hi[4 * v + 3] += b.w;
        }
      }
    }

    // ---------------- epilogue ----------------
    {
      const int m = m0 + tid;
      const float sf = m < p.M ? __half2float(p.ascale[m]) : 0.f;
      const float mf = (kGroup == 0 && m < p.M) ? __half2float(p.asum[m]) : 0.f;
      asd[tid] = sf;
      amd[tid] = mf;
      asf[tid] = sf;
      amf[tid] = mf;
    }
    float s1f[4], szf[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {   // q: 0 -> lo row g, 1 -> lo g+8, 2 -> hi g, 3 -> hi g+8
      const int c = cbase + 8 * (q & 1) + 16 * (q >> 1);
      s1f[q] = __half2float(p.s1[nbase + c]);
      szf[q] = kGroup == 0 ? __half2float(p.szeros[nbase + c]) : 0.f;
    }
    named_bar_sync(bar_id, 128);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int rp = 0; rp < 2; ++rp) {       // accumulator pair (r = 2rp, 2rp+1): tokens tok, tok+1, same row
        const int tok = 8 * i + 2 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int q = rp + 2 * h;
          const int c = cbase + 8 * rp + 16 * h;
          const int p0 = h ? acc_hi[4 * i + 2 * rp] : acc_lo[4 * i + 2 * rp];
          const int p1 = h ? acc_hi[4 * i + 2 * rp + 1] : acc_lo[4 * i + 2 * rp + 1];
#if DCC_WGMMA_EPI == 0
          const __half o0 = exact_out<kGroup>(p0, s1f[q], szf[q], asd[tok], amd[tok]);
          const __half o1 = exact_out<kGroup>(p1, s1f[q], szf[q], asd[tok + 1], amd[tok + 1]);
#else
          // float path: a = s1*as and b = sz*asum are exact (fp16 x fp16), psum is exact in float below 2^22, so
          // fma(psum, a, -b) is the exact value rounded once to float: the same float as the double path (up to
          // a double-rounding tie of probability ~2^-29), then one rounding to fp16. Larger |psum|: double path.
          const float pf0 = __int_as_float(0x4B400000 + p0) - 12582912.f;   // 1.5 * 2^23 magic: exact, |p| < 2^22
          const float pf1 = __int_as_float(0x4B400000 + p1) - 12582912.f;
          const float v0 = fmaf(pf0, s1f[q] * asf[tok], -(szf[q] * amf[tok]));
          const float v1 = fmaf(pf1, s1f[q] * asf[tok + 1], -(szf[q] * amf[tok + 1]));
          __half2 o = __floats2half2_rn(v0, v1);
          if (__builtin_expect(static_cast<uint32_t>(p0 + (1 << 22)) >= (1u << 23) ||
                               static_cast<uint32_t>(p1 + (1 << 22)) >= (1u << 23), 0))
            o = __halves2half2(exact_out<kGroup>(p0, s1f[q], szf[q], asd[tok], amd[tok]),
                               exact_out<kGroup>(p1, s1f[q], szf[q], asd[tok + 1], amd[tok + 1]));
          const __half o0 = __low2half(o), o1 = __high2half(o);
#endif
          T[tok * kEpiStride + c] = o0;
          T[(tok + 1) * kEpiStride + c] = o1;
        }
      }
    }
    named_bar_sync(bar_id, 128);
    const uint32_t T0 = smem_addr(T);
#pragma unroll 4
    for (int e = tid; e < kTileM * 16; e += 128) {
      const int row = e / 16, chunk = e % 16;
      if (m0 + row < p.M) {
        const uint4 v = lds128(T0 + (row * kEpiStride + chunk * 8) * 2);
        *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(m0 + row) * p.N + nbase + chunk * 8) = v;
      }
    }
  }
#endif
}

// ---------------------------------------------------------------- host side
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) ==
            cudaSuccess && q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(f);
  });
  return fn;
}

template <int kGroup>
bool kernel_ready() {
  // The sm_90a body exists only where it was compiled for sm_90a; a stub has (almost) no registers. Also raises
  // the kernel's shared-memory limit once.
  static int ready = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaFuncAttributes a{};
    ready = 0;
    if (cudaFuncGetAttributes(&a, w4a8_wgmma_kernel<kGroup>) != cudaSuccess) { cudaGetLastError(); return; }
    if (a.binaryVersion < 90 || a.numRegs < 64) return;
    if (cudaFuncSetAttribute(w4a8_wgmma_kernel<kGroup>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmemBytes) != cudaSuccess) { cudaGetLastError(); return; }
    if (encode_fn() == nullptr) return;
    ready = 1;
  });
  return ready == 1;
}

bool ready_for(int group) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9) return false;
  switch (group) {
    case 0: return kernel_ready<0>();
    case 64: return kernel_ready<64>();
    case 128: return kernel_ready<128>();
    default: return false;
  }
}

int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
  }
  return n;
}

// K splits (measured on the H100 at M = 128, 256: csrc/w4a8/NOTES.md): as many as fit in one wave, each >= 8 stages.
int choose_splits(int M, int N, int K) {
  if (const char* e = std::getenv("DCC_W4A8_WGMMA_SPLITS")) {
    const int s = std::atoi(e);
    if (s >= 1 && (K / kTileK) % s == 0) return s;
  }
  const int tiles = ((M + kTileM - 1) / kTileM) * (N / kTileN);
  const int kt = K / kTileK;
  int best = 1;
  for (int s = 2; s <= 8; s *= 2) {   // the largest power of two that fits one wave and keeps >= 8 stages a split
    if (kt % s || kt / s < 8 || tiles * s > sm_count()) break;
    best = s;
  }
  return best;
}

constexpr size_t kCounterBytes = 64 * 1024;   // 16384 tile counters

// Split-K workspace: [counters][tiles][splits][256 threads][128 int32] (fragment-order partial sums).
size_t workspace_for(int M, int N, int K) {
  const int s = choose_splits(M, N, K);
  if (s <= 1) return 0;
  const size_t tiles = static_cast<size_t>((M + kTileM - 1) / kTileM) * (N / kTileN);
  return kCounterBytes + tiles * s * 256 * 128 * sizeof(int32_t);
}

bool shape_ok(int M, int N, int K, int group) {
  if (M < 1 || N < kTileN || K < kTileK || N % kTileN || K % kTileK) return false;
  if (group != 0 && group != 64 && group != 128) return false;
  if (static_cast<long long>(M) * K >= (1LL << 40)) return false;
  const long long tiles = static_cast<long long>((M + kTileM - 1) / kTileM) * (N / kTileN);
  return tiles <= 0x7FFFFFFF;
}

}  // namespace

size_t gemm_wgmma_workspace(int M, int N, int K, int group) {
  if (!shape_ok(M, N, K, group)) return 0;
  return workspace_for(M, N, K);
}

bool gemm_wgmma_supported(int M, int N, int K, int group) {
  return shape_ok(M, N, K, group) && ready_for(group);
}

cudaError_t gemm_wgmma(const void* xq, const void* ascale, const void* asum, const void* qweight,
                       const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                       void* out, int M, int N, int K, int group, void* workspace, size_t ws_bytes,
                       cudaStream_t stream) {
  if (!shape_ok(M, N, K, group) || !ready_for(group)) return cudaErrorNotSupported;
  if (!xq || !ascale || !qweight || !s1_scales || !out) return cudaErrorInvalidValue;
  if (group == 0 && (!s1_szeros || !asum)) return cudaErrorInvalidValue;
  if (group != 0 && (!s2_scales || !s2_zeros)) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(xq) | reinterpret_cast<uintptr_t>(qweight) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(s2_scales) | reinterpret_cast<uintptr_t>(s2_zeros)) & 15)
    return cudaErrorInvalidValue;

  WgParams p{};
  p.qweight = static_cast<const uint8_t*>(qweight);
  p.ascale = static_cast<const __half*>(ascale);
  p.asum = static_cast<const __half*>(asum);
  p.s1 = static_cast<const __half*>(s1_scales);
  p.szeros = static_cast<const __half*>(s1_szeros);
  p.s2s = static_cast<const uint8_t*>(s2_scales);
  p.s2z = static_cast<const uint8_t*>(s2_zeros);
  p.out = static_cast<__half*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.num_m_tiles = (M + kTileM - 1) / kTileM;
  p.splits = choose_splits(M, N, K);
  if (p.splits > 1) {
    // the workspace must be zero before its first use; every call leaves it zero again
    if (!workspace || ws_bytes < workspace_for(M, N, K)) {
      p.splits = 1;
    } else {
      p.counters = static_cast<uint32_t*>(workspace);
      p.partial = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + kCounterBytes);
    }
  }

  CUtensorMap tmap;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K)};
  const cuuint32_t box[2] = {kTileK, kTileM};
  const cuuint32_t estr[2] = {1, 1};
  if (encode_fn()(&tmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(xq), dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;

  // persistent grid (at most one CTA per SM; the producer prefetches the next tile during the epilogue)
  const int tiles = p.num_m_tiles * (N / kTileN);
  int ctas = tiles < sm_count() ? tiles : sm_count();
  if (const char* e = std::getenv("DCC_W4A8_WGMMA_PERSISTENT"))
    if (e[0] == '0') ctas = tiles;
  const dim3 grid(ctas, p.splits);
  switch (group) {
    case 0: w4a8_wgmma_kernel<0><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
    case 64: w4a8_wgmma_kernel<64><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
    default: w4a8_wgmma_kernel<128><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
  }
  return cudaGetLastError();
}

}  // namespace dcc_w4a8
