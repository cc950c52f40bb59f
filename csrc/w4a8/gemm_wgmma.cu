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
//  - Pipelining: per k32 step: ld.shared + unpack, wgmma.fence, 2 wgmmas, commit, wait_group 1 (the previous
//    step's wgmmas done: its A registers are free and, at a stage's first step, the previous stage can be released).
//  - Numerics: psum is the exact int32 sum (s8 x s8 -> s32 tensor-core accumulation). Epilogue per output:
//    a = s1[n]*ascale[m] and b = szeros[n]*asum[m] are exact in float (products of two fp16), psum*a - b is
//    computed with one double fma (psum*a is exact in double: <= 47 bits), so v is the exact result rounded once
//    to double; then double -> float -> fp16, the same rounding chain as the mma.sync kernels (common.cuh) and the
//    CPU reference. Outputs go through shared memory for 16-byte coalesced stores; tokens >= M are masked (the TMA
//    load fills rows past M with zeros).
//  - Split-K (few output tiles, e.g. M = 128): S CTAs per output tile accumulate int32 partials into a workspace
//    with red.global.add; the last CTA to arrive (counter) applies the epilogue and re-zeroes its workspace tile.
// Requirements (gemm_wgmma_supported): sm_90a device code present, N % 256 == 0, K % 128 == 0, group 0/64/128,
// K/128 a multiple of the split count.
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
constexpr int kScaleBytes = 2 * 2 * kTileM * 4;           // per warpgroup: ascale, asum as float
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

template <int kGroup>
__global__ void __launch_bounds__(kThreads, 1) w4a8_wgmma_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const WgParams p) {
#if defined(DCC_WGMMA_DEVICE)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stages = smem;
  __half* epi = reinterpret_cast<__half*>(smem + kStages * kStageBytes);
  float* scl = reinterpret_cast<float*>(smem + kStages * kStageBytes + kEpiBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + kEpiBytes + kScaleBytes);
  __shared__ int s_last;
  const uint32_t full0 = smem_addr(bars), empty0 = smem_addr(bars + kStages);

  const int tile = blockIdx.x;
  const int m_tile = tile % p.num_m_tiles, n_tile = tile / p.num_m_tiles;
  const int split = blockIdx.y;
  const int m0 = m_tile * kTileM, n0 = n_tile * kTileN;
  const int KT = p.K / kTileK / p.splits;   // stages of this split
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
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      constexpr int gps = kGroup == 0 ? 0 : kTileK / kGroup;   // groups per stage
      constexpr uint32_t bytes = kActBytes + kWBytes + gps * 2 * kTileN;
      const size_t kblocks = static_cast<size_t>(p.K / 32);
      for (int it = 0; it < KT; ++it) {
        const int s = it % kStages;
        mbar_wait(empty0 + 8 * s, ((it / kStages) & 1) ^ 1);
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
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp / 4, wq = warp % 4;
  const int g = lane / 4, t = lane % 4;
  int acc_lo[64], acc_hi[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc_lo[i] = acc_hi[i] = 0;

  const uint32_t stage0 = smem_addr(stages);
  const uint32_t w_off = kActBytes + (wg * 4 + wq) * 2048 + lane * 16;
  const uint32_t s2_off = kActBytes + kWBytes + (wg * 128 + wq * 32 + 4 * g);

  for (int it = 0; it < KT; ++it) {
    const int s = it % kStages;
    mbar_wait(full0 + 8 * s, (it / kStages) & 1);
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
      if (j == 0 && it > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((it - 1) % kStages));
    }
  }
  wgmma_wait<0>();

  const int tid = threadIdx.x % 128;
  const int bar_id = 1 + wg;
  // channels of this thread within the warpgroup's 128: lo rows g, g+8 -> 32wq + g (+8); hi -> 32wq + 16 + g (+8)
  const int cbase = 32 * wq + g;
  const int nbase = n0 + wg * 128;

  if (p.splits > 1) {
    // accumulate int32 partials; the last CTA of the tile finishes
    int32_t* part = p.partial + static_cast<size_t>(m0) * p.N + nbase;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int tok = 8 * i + 2 * t + (r & 1), c = cbase + 8 * (r >> 1);
        if (m0 + tok < p.M) {
          atomicAdd(part + static_cast<size_t>(tok) * p.N + c, acc_lo[4 * i + r]);
          atomicAdd(part + static_cast<size_t>(tok) * p.N + c + 16, acc_hi[4 * i + r]);
        }
      }
    }
    __threadfence();
    named_bar_sync(3, 256);
    if (threadIdx.x == 0) {
      const uint32_t prev = atomicAdd(p.counters + tile, 1u);
      s_last = prev == static_cast<uint32_t>(p.splits - 1);
      if (s_last) p.counters[tile] = 0;
    }
    named_bar_sync(3, 256);
    if (!s_last) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int tok = 8 * i + 2 * t + (r & 1), c = cbase + 8 * (r >> 1);
        if (m0 + tok < p.M) {
          int32_t* a = part + static_cast<size_t>(tok) * p.N + c;
          acc_lo[4 * i + r] = __ldcg(a);
          acc_hi[4 * i + r] = __ldcg(a + 16);
          __stcg(a, 0);
          __stcg(a + 16, 0);
        }
      }
    }
  }

  // ---------------- epilogue ----------------
  float* as = scl + wg * 2 * kTileM;
  float* am = as + kTileM;
  {
    const int m = m0 + tid;
    as[tid] = m < p.M ? __half2float(p.ascale[m]) : 0.f;
    am[tid] = (kGroup == 0 && m < p.M) ? __half2float(p.asum[m]) : 0.f;
  }
  float s1v[4], szv[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {   // q: 0 -> lo row g, 1 -> lo g+8, 2 -> hi g, 3 -> hi g+8
    const int c = cbase + 8 * (q & 1) + 16 * (q >> 1);
    s1v[q] = __half2float(p.s1[nbase + c]);
    szv[q] = kGroup == 0 ? __half2float(p.szeros[nbase + c]) : 0.f;
  }
  named_bar_sync(bar_id, 128);
  __half* T = epi + wg * kTileM * kEpiStride;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int tok = 8 * i + 2 * t + (r & 1);
      const float a_s = as[tok], a_m = am[tok];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = (r >> 1) + 2 * h;
        const int c = cbase + 8 * (r >> 1) + 16 * h;
        const int psum = h ? acc_hi[4 * i + r] : acc_lo[4 * i + r];
        const float a = s1v[q] * a_s;   // exact (fp16 x fp16)
        double v = static_cast<double>(a) * static_cast<double>(psum);
        if (kGroup == 0) v -= static_cast<double>(szv[q] * a_m);   // exact operands, one rounding
        T[tok * kEpiStride + c] = __float2half_rn(__double2float_rn(v));
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

// K splits: only when the output tiles fill less than half of the GPU; each split keeps >= 4 stages.
int choose_splits(int M, int N, int K) {
  if (const char* e = std::getenv("DCC_W4A8_WGMMA_SPLITS")) {
    const int s = std::atoi(e);
    if (s >= 1 && (K / kTileK) % s == 0) return s;
  }
  const int tiles = ((M + kTileM - 1) / kTileM) * (N / kTileN);
  const int kt = K / kTileK;
  int best = 1;
  for (int s = 2; s <= 8; ++s) {
    if (kt % s || kt / s < 4) continue;
    if (tiles * s > sm_count()) break;
    best = s;
  }
  return tiles * 2 > sm_count() ? 1 : best;
}

constexpr size_t kCounterBytes = 64 * 1024;   // 16384 tile counters

size_t workspace_for(int M, int N, int K) {
  if (choose_splits(M, N, K) <= 1) return 0;
  const size_t mpad = static_cast<size_t>((M + kTileM - 1) / kTileM) * kTileM;
  return kCounterBytes + mpad * N * sizeof(int32_t);
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

  const dim3 grid(p.num_m_tiles * (N / kTileN), p.splits);
  switch (group) {
    case 0: w4a8_wgmma_kernel<0><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
    case 64: w4a8_wgmma_kernel<64><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
    default: w4a8_wgmma_kernel<128><<<grid, kThreads, kSmemBytes, stream>>>(tmap, p); break;
  }
  return cudaGetLastError();
}

}  // namespace dcc_w4a8
