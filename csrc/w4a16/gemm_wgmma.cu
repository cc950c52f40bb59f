// Hopper (sm_90a) W4A16 GEMM on wgmma for the TinyChat layout, for the M range between the GEMV kernels (M <= 16)
// and dequantise + cuBLAS (large M), where the fused mma.sync kernel ran at 0.46-0.60x cuBLAS fp16 (DESIGN.md).
//
// Design ("swap AB", as csrc/w4a8's wgmma kernel): the kernel computes out^T = W . X^T, so the weights are the wgmma
// A operand, dequantised into registers, and the 16-bit activations the B operand, straight from shared memory.
//  - The layout's 16 bytes of (row n, 32-run of k) are four words; word t holds the pairs k0 + 8i + 2t (+1),
//    i = 0..3, which is exactly what lane t of a row quad needs for two k16 steps of the A fragment (common.cuh,
//    dequant_word): a lane reads one 32-bit word per row and 32-run, nothing is repacked.
//  - CTA tile: 128 channels (two consumer warpgroups x 64: one m64 wgmma each) x T tokens (T = 64 or 128, the
//    wgmma N), k stage 64. One producer thread fills a ring of mbarrier-guarded stages: the activation box
//    [T tokens][64 k] by a 2D TMA load with 128-byte swizzle (the wgmma B layout: K-major, SW128; rows past M come
//    back as zeros), the weight box [32 qweight rows = 128 channels][64 k] by a second 2D TMA load (SW128: a warp's
//    32 word reads hit 32 banks), and the stage's group rows of scales and scaled zeros (256 bytes each) by bulk
//    copies. Per stage a consumer thread reads 4 words and 2 (G = 32: 4) scale pairs, dequantises 16 pairs into
//    one of two register sets, and issues the stage's four wgmmas as one group; wait_group 1 retires the previous
//    stage's group (its register set and ring slot become free) while this one runs.
//  - Split-K where the tiles alone would leave SMs idle: S in {2, 4, 8} CTAs per tile form a cluster (grid.y), each
//    taking K / S. Epilogue: every CTA writes its fp32 partial tile [T][128] into its (consumed) ring, a cluster
//    barrier publishes it, and CTA rank r sums rows [rT/S, (r+1)T/S) of the S partials over distributed shared
//    memory in rank order (fixed: deterministic), adds the bias in fp32 and rounds once to the 16-bit type, 8 bytes
//    per store, 256 contiguous bytes per warp. No global workspace, no second kernel.
//  - Numerics: weights rnd(q s + sz) in the 16-bit type, bit-identical to decode_weight; 16-bit products exact in
//    fp32, fp32 accumulation (the order inside the tensor core's k16 steps is the hardware's), one rounding per
//    output. Same contract as the other paths (DESIGN.md, Numerics), not bit-equal to them.
// Requirements (gemm_wgmma_supported): sm_90a device code present, N % 128 == 0, K % 64 == 0, G in {32, 64, 128},
// x, qweight, scales, scaled_zeros and out 16-byte aligned.
// Override (tests and benchmarks): DCC_W4A16_WGMMA_CFG="tile=T,splits=S,sets=3" forces the token tile (64, 128;
// 256 is opt-in, not yet measured), S, and three A register sets instead of two (not yet measured).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include <cuda.h>   // CUtensorMap and the cuTensorMapEncodeTiled prototype only; resolved at run time
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "util.h"
#include "w4a16.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "sm90_ptx.cuh"
#define DCC_W4A16_WGMMA_DEVICE 1
#endif

namespace dcc_w4a16 {
namespace {

constexpr int kThreads = 384;     // warpgroup 0-1: consumers, 2: producer
constexpr int kTileN = 128;       // channels per CTA
constexpr int kTileK = 64;        // k per stage: 128 bytes of 16-bit activations per token row
constexpr int kPartStride = kTileN + 4;   // floats per token row of the fp32 partial tile (conflict-free stores)

struct WgParams {
  const uint8_t* scales;    // [Kg, N] 16-bit
  const uint8_t* szeros;    // [Kg, N] 16-bit
  const void* bias;         // [N] 16-bit or null
  void* out;                // [M, N] 16-bit
  int M, N, K, group, mtiles, S, kt_split;   // kt_split: k stages per split
};

template <int kTok, int kStages>
struct Cfg {
  static constexpr int kActBytes = kTok * kTileK * 2;
  static constexpr int kWBytes = (kTileN / 4) * kTileK * 2;   // 32 qweight rows x 128 bytes
  static constexpr int kScaleBytes = 1024;                    // up to 2 groups x (256 B scales + 256 B zeros)
  static constexpr int kStageBytes = kActBytes + kWBytes + kScaleBytes;   // multiple of 1024: SW128 boxes aligned
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kPartBytes = kTok * kPartStride * 4;
  static_assert(kRingBytes >= kPartBytes, "the partial tile reuses the ring");
  static constexpr int kSmemBytes = 1024 + kRingBytes + 2 * kStages * 8;
};
// Ring depth: deeper rings (9 / 14 stages, 194 / 182 KB) measured no faster on the H100 (DESIGN.md), so the
// stage time is not set by the weight bytes in flight.
using CfgLarge = Cfg<128, 6>;   // 129 KB ring
using CfgMid = Cfg<64, 8>;      // 106 KB ring
// 256-token tiles (opt-in, DCC_W4A16_WGMMA_CFG=tile=256, not yet measured): half the CTAs of CfgLarge, for M where
// 128-token tiles take a second wave (14336 x 4096 at M = 256: 224 tiles on 132 SMs); 128 accumulators a thread.
using CfgWide = Cfg<256, 4>;    // 148 KB ring

// kSets: A register sets, i.e. stage groups of wgmmas in flight while the next stage is dequantised (2: the previous
// stage's group must retire before the next stage is unpacked; 3: two groups in flight).
template <bool kBf16, int kTok, int kStages, int kSets>
__global__ void __launch_bounds__(kThreads, 1) w4a16_wgmma_kernel(const __grid_constant__ CUtensorMap tx,
                                                                  const __grid_constant__ CUtensorMap tw,
                                                                  const WgParams p) {
#if defined(DCC_W4A16_WGMMA_DEVICE)
  using namespace sm90;
  using C = Cfg<kTok, kStages>;
  using T = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  using H = Half2Of<T>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t ring = smem_addr(smem);
  const uint32_t full0 = ring + C::kRingBytes, empty0 = full0 + 8 * kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);   // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int m0 = (blockIdx.x % p.mtiles) * kTok, n0 = (blockIdx.x / p.mtiles) * kTileN;
  const int split = blockIdx.y, KT = p.kt_split, kt0 = split * KT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (warp >= 8) {
    // ---------------- producer: one thread streams the split's k stages through the ring ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      const int groups = p.group == 32 ? 2 : 1;   // group rows a 64-k stage touches (G >= 64: the one it lies in)
      const uint32_t bytes = C::kActBytes + C::kWBytes + groups * 512;
      for (int it = 0; it < KT; ++it) {
        const int s = it % kStages;
        mbar_wait(empty0 + 8 * s, ((it / kStages) & 1) ^ 1);
        const uint32_t full = full0 + 8 * s, st = ring + s * C::kStageBytes;
        const int k0 = (kt0 + it) * kTileK;
        mbar_arrive_expect_tx(full, bytes);   // the TMA boxes count in full, rows past M included
        tma_load_2d(st, &tx, k0, m0, full);
        tma_load_2d(st + C::kActBytes, &tw, k0, n0 / 4, full);
        for (int gi = 0; gi < groups; ++gi) {
          const size_t row = static_cast<size_t>(k0 / p.group + gi) * p.N + n0;
          bulk_load(st + C::kActBytes + C::kWBytes + gi * 512, p.scales + 2 * row, 256, full);
          bulk_load(st + C::kActBytes + C::kWBytes + gi * 512 + 256, p.szeros + 2 * row, 256, full);
        }
      }
    }
    if (p.S > 1) {   // the consumers' two cluster barriers: every thread of the cluster takes part
      cluster_sync_all();
      cluster_sync_all();
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4;
  // this thread's channels (CTA-local): the A fragment's rows g and g + 8 of warp wq's 16
  const int c0 = wg * 64 + wq * 16 + g, c1 = c0 + 8;
  // word t of the 16-byte chunk (channel c, 32-run h) in the SW128 weight box: qweight row c / 4 is a 128-byte line
  // whose chunk 2 (c % 4) + h sits at chunk index (2 (c % 4) + h) ^ (line % 8)
  auto waddr = [&](int c, int h) -> uint32_t {
    const int line = c >> 2;
    return line * 128 + (((2 * (c & 3) + h) ^ (line & 7)) << 4) + 4 * t;
  };
  const uint32_t wa00 = waddr(c0, 0), wa01 = waddr(c0, 1), wa10 = waddr(c1, 0), wa11 = waddr(c1, 1);
  float acc[kTok / 2];
#pragma unroll
  for (int i = 0; i < kTok / 2; ++i) acc[i] = 0.f;
  static_assert(kSets == 2 || kSets == 3, "register sets");
  uint32_t fr[kSets][4][4];   // [register set][k16 step][A fragment]

  auto stage = [&](auto set_c, int it) {
    constexpr int set = decltype(set_c)::value;
    const int s = it % kStages;
    mbar_wait(full0 + 8 * s, (it / kStages) & 1);
    const uint32_t st = ring + s * C::kStageBytes, wt = st + C::kActBytes, sc = wt + C::kWBytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // the 32-run's group row in the stage's scale area (G = 32: one per run; else the stage's one)
      const uint32_t gs = sc + (p.group == 32 ? h * 512 : 0);
      const auto s0 = H::broadcast(H::from_bits(lds16(gs + 2 * c0)));
      const auto z0 = H::broadcast(H::from_bits(lds16(gs + 256 + 2 * c0)));
      const auto s1 = H::broadcast(H::from_bits(lds16(gs + 2 * c1)));
      const auto z1 = H::broadcast(H::from_bits(lds16(gs + 256 + 2 * c1)));
      uint32_t q0[4], q1[4];
      dequant_word<T>(lds32(wt + (h ? wa01 : wa00)), s0, z0, q0);
      dequant_word<T>(lds32(wt + (h ? wa11 : wa10)), s1, z1, q1);
#pragma unroll
      for (int cl = 0; cl < 2; ++cl) {   // k16 step 2h + cl: pairs i = 2cl (k 2t) and 2cl + 1 (k 8 + 2t)
        fr[set][2 * h + cl][0] = q0[2 * cl];
        fr[set][2 * h + cl][1] = q1[2 * cl];
        fr[set][2 * h + cl][2] = q0[2 * cl + 1];
        fr[set][2 * h + cl][3] = q1[2 * cl + 1];
      }
    }
    const uint64_t desc = desc_sw128(st);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_rs<kBf16, kTok>(acc, fr[set][j], desc + ((j * 32) >> 4));
    wgmma_commit();
    // the group of stage it - (kSets - 1) retired: its register set (the next stage's) and its ring slot are free
    wgmma_wait<kSets - 1>();
    if (it >= kSets - 1 && lane == 0) mbar_arrive(empty0 + 8 * ((it - (kSets - 1)) % kStages));
  };
  int it = 0;
  for (; it + kSets <= KT; it += kSets) {   // unrolled by kSets: the register set is a constant
    stage(std::integral_constant<int, 0>(), it);
    stage(std::integral_constant<int, 1>(), it + 1);
    if constexpr (kSets == 3) stage(std::integral_constant<int, 2 % kSets>(), it + 2);
  }
  if (it < KT) stage(std::integral_constant<int, 0>(), it);
  if (it + 1 < KT) stage(std::integral_constant<int, 1>(), it + 1);
  wgmma_wait<0>();

  // ---------------- epilogue ----------------
  // Every stage was consumed and its wgmmas retired once both warpgroups pass this barrier: the ring holds the fp32
  // partial tile P[token][channel] (row stride kPartStride floats). d[4i + r] = (channel 16 wq + g + 8 (r / 2),
  // token 8i + 2t + r % 2).
  named_bar_sync(1, 256);
#pragma unroll
  for (int i = 0; i < kTok / 8; ++i) {
    const int tok = 8 * i + 2 * t;
    sts_f1(ring + (tok * kPartStride + c0) * 4, acc[4 * i]);
    sts_f1(ring + ((tok + 1) * kPartStride + c0) * 4, acc[4 * i + 1]);
    sts_f1(ring + (tok * kPartStride + c1) * 4, acc[4 * i + 2]);
    sts_f1(ring + ((tok + 1) * kPartStride + c1) * 4, acc[4 * i + 3]);
  }
  if (p.S > 1) cluster_sync_all();
  else named_bar_sync(1, 256);
  const int rows = kTok / p.S, row0 = split * rows;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  for (int e = threadIdx.x; e < rows * (kTileN / 4); e += 256) {
    const int row = row0 + e / (kTileN / 4), c = 4 * (e % (kTileN / 4));
    const uint32_t off = ring + (row * kPartStride + c) * 4;
    float4 v = p.S > 1 ? ld_cluster_f4(mapa(off, 0)) : lds_f4(off);
    for (int z = 1; z < p.S; ++z) {   // the splits' partials in rank order
      const float4 w = ld_cluster_f4(mapa(off, z));
      v.x += w.x; v.y += w.y; v.z += w.z; v.w += w.w;
    }
    const int m = m0 + row;
    if (m < p.M) {
      if (bias != nullptr) {
        v.x += H::to_float(bias[n0 + c]); v.y += H::to_float(bias[n0 + c + 1]);
        v.z += H::to_float(bias[n0 + c + 2]); v.w += H::to_float(bias[n0 + c + 3]);
      }
      const typename H::T2 lo(H::from_float(v.x), H::from_float(v.y)), hi(H::from_float(v.z), H::from_float(v.w));
      uint2 pk;
      pk.x = as_bits(lo);
      pk.y = as_bits(hi);
      *reinterpret_cast<uint2*>(out + static_cast<size_t>(m) * p.N + n0 + c) = pk;
    }
  }
  if (p.S > 1) cluster_sync_all();   // the other CTAs have read this CTA's partials
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

int device_attr(cudaDeviceAttr a) {
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&v, a, dev);
  return v;
}
int num_sms() { return device_attr(cudaDevAttrMultiProcessorCount); }

template <bool kBf16, class C, int kSets = 2>
struct KernelOf;
template <bool kBf16, int kTok, int kStages, int kSets>
struct KernelOf<kBf16, Cfg<kTok, kStages>, kSets> {
  static constexpr auto fn = w4a16_wgmma_kernel<kBf16, kTok, kStages, kSets>;
};

template <class C>
bool set_smem() {
  const auto set = [](const void* fn) {
    return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes) == cudaSuccess;
  };
  return set(reinterpret_cast<const void*>(KernelOf<false, C>::fn)) &&
         set(reinterpret_cast<const void*>(KernelOf<true, C>::fn)) &&
         set(reinterpret_cast<const void*>(KernelOf<false, C, 3>::fn)) &&
         set(reinterpret_cast<const void*>(KernelOf<true, C, 3>::fn));
}

// The sm_90a body exists only where it was compiled for sm_90a (a stub has almost no registers); raises the
// kernels' shared-memory limits once.
bool ready() {
  static int state = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    state = 0;
    if (device_attr(cudaDevAttrComputeCapabilityMajor) != 9 || encode_fn() == nullptr) return;
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, KernelOf<false, CfgLarge>::fn) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (a.binaryVersion < 90 || a.numRegs < 64) return;
    if (!set_smem<CfgLarge>() || !set_smem<CfgMid>() || !set_smem<CfgWide>()) {
      cudaGetLastError();
      return;
    }
    state = 1;
  });
  return state == 1;
}

// The value of `key` in DCC_W4A16_WGMMA_CFG ("tile=T,splits=S"), -1 where it is not set; read at every call.
int cfg_override(const char* key) {
  const size_t n = std::strlen(key);
  for (const char* s = std::getenv("DCC_W4A16_WGMMA_CFG"); s != nullptr; s = std::strchr(s, ',')) {
    if (*s == ',') ++s;
    if (std::strncmp(s, key, n) == 0 && s[n] == '=') return std::atoi(s + n + 1);
  }
  return -1;
}

cudaLaunchConfig_t launch_config(dim3 grid, int smem, int cluster, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = cluster;
    attr[0].val.clusterDim.z = 1;
    cfg.numAttrs = 1;
  }
  return cfg;
}

// Clusters of S CTAs the GPU holds at once (cached per configuration and S); 0 where it cannot run them.
template <class C>
int max_clusters(int S) {
  static int cache[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
  if (cache[S] < 0) {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = launch_config(dim3(1, S), C::kSmemBytes, S, nullptr, attr);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, KernelOf<false, C>::fn, &cfg) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    cache[S] = n;
  }
  return cache[S];
}

// K splits S (a power of two <= 8): the largest with tiles * S <= SMs, at least 8 k stages per split, S dividing
// the stage count, and every tile's cluster resident at once. DCC_W4A16_WGMMA_CFG="splits=S" forces S where valid.
template <class C>
int choose_splits(int tiles, int K) {
  const int kt = K / kTileK;
  const auto valid = [&](int s) { return kt % s == 0 && (s == 1 || max_clusters<C>(s) > 0); };
  const int forced = cfg_override("splits");
  if ((forced == 1 || forced == 2 || forced == 4 || forced == 8) && valid(forced)) return forced;
  int best = 1;
  for (int s = 2; s <= 8; s *= 2) {
    if (kt / s < 8 || kt % s || tiles * s > num_sms() || max_clusters<C>(s) < tiles) break;
    best = s;
  }
  return best;
}

bool make_map(CUtensorMap* map, const void* base, int rows, int cols, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {kTileK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estr[2] = {1, 1};
  return encode_fn()(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims, strides, box, estr,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <bool kBf16, class C>
void launch(const void* x, const void* qweight, WgParams p, int* splits_out, cudaStream_t stream) {
  constexpr int kTok = C::kActBytes / (kTileK * 2);
  CUtensorMap tx, tw;
  if (!make_map(&tx, x, p.M, p.K, kTok) || !make_map(&tw, qweight, p.N / 4, p.K, kTileN / 4))
    throw std::runtime_error("dcc w4a16: cuTensorMapEncodeTiled refused the wgmma GEMM's tensor maps");
  p.mtiles = (p.M + kTok - 1) / kTok;
  const int tiles = p.mtiles * (p.N / kTileN);
  p.S = choose_splits<C>(tiles, p.K);
  p.kt_split = p.K / kTileK / p.S;
  if (splits_out != nullptr) *splits_out = p.S;
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(tiles, p.S), C::kSmemBytes, p.S, stream, attr);
  // DCC_W4A16_WGMMA_CFG="sets=3": three A register sets (two stage groups in flight), to be measured
  const auto fn = cfg_override("sets") == 3 ? KernelOf<kBf16, C, 3>::fn : KernelOf<kBf16, C>::fn;
  check_cuda(cudaLaunchKernelEx(&cfg, fn, tx, tw, p), "wgmma GEMM launch");
}

}  // namespace

bool gemm_wgmma_supported(int M, int N, int K, int group_size) {
  if (M < 1 || N < kTileN || N % kTileN || K < kTileK || K % kTileK) return false;
  if ((group_size != 32 && group_size != 64 && group_size != 128) || K % group_size) return false;
  if (static_cast<long long>(M) * K >= (1LL << 40)) return false;
  return ready();
}

int gemm_wgmma_tile(int M) {
  const int forced = cfg_override("tile");
  if (forced == 64 || forced == 128 || forced == 256) return forced;
  return M <= 64 ? 64 : 128;
}

int gemm_wgmma(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
               const void* bias, void* out, int M, int N, int K, int group_size, cudaStream_t stream) {
  check_problem(M, N, K, group_size);
  if (!gemm_wgmma_supported(M, N, K, group_size))
    throw std::invalid_argument("dcc w4a16: the wgmma GEMM needs an sm_90a build on an sm_90 GPU, N % 128 == 0 and "
                                "K % 64 == 0 (N = " + std::to_string(N) + ", K = " + std::to_string(K) + ")");
  for (const auto& [ptr, name] : {std::pair<const void*, const char*>{x, "x"}, {qweight, "qweight"},
                                  {scales, "scales"}, {scaled_zeros, "scaled_zeros"}, {out, "out"}})
    check_aligned(ptr, name);
  if (bias != nullptr && reinterpret_cast<uintptr_t>(bias) % 8)
    throw std::invalid_argument("dcc w4a16: bias is not 8-byte aligned");
  WgParams p{};
  p.scales = static_cast<const uint8_t*>(scales);
  p.szeros = static_cast<const uint8_t*>(scaled_zeros);
  p.bias = bias;
  p.out = out;
  p.M = M;
  p.N = N;
  p.K = K;
  p.group = group_size;
  int splits = 1;
  const bool bf16 = dt == DType::kBFloat16;
  const auto run = [&](auto cfg) {
    using C = decltype(cfg);
    if (bf16) launch<true, C>(x, qweight, p, &splits, stream);
    else launch<false, C>(x, qweight, p, &splits, stream);
  };
  const int tile = gemm_wgmma_tile(M);
  if (tile == 64) run(CfgMid());
  else if (tile == 128) run(CfgLarge());
  else run(CfgWide());
  return splits;
}

}  // namespace dcc_w4a16
