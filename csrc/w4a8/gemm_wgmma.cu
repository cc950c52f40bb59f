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
//  - CTA tile: 256 channels (2 consumer warpgroups x 128) x T tokens, k stage 128; T = 128 with a 4-stage ring for
//    large M, T = 64 with 6 stages for medium M (use_mid), T = 16 with 8 stages for M <= 16 (wgmma_cfg.cuh,
//    WgCfg). One producer warp (lane 0)
//    fills the shared-memory ring guarded by mbarriers: the activation tile [T tokens][128 k] by a 2D TMA
//    load with 128-byte swizzle (the wgmma B layout: K-major, SW128), the weight tiles by 8 bulk copies of 2 KB
//    (each 32-channel block's four 32x32 tiles of the stage are contiguous), and for groups the stage's s2 rows
//    (2 x 256 bytes per group). Consumers read their 16 bytes per k32 step with one ld.shared.v4. The 16-token
//    tile keeps its weights in a separate region [8 blocks][8 slots][2 KB] and brings two stages per block in one
//    4 KB copy (weight groups, WgCfg::kWGroup; H200: four stages per 8 KB copy against one per 2 KB copy took
//    4096x14336 M = 16 from 14.1 to 13.6 us; two per 4 KB copy, with the per-channel whole-byte stage loop below,
//    14336x4096 10.85 -> 10.01 us and 4096x14336 11.6-11.8 -> 11.3 against four: the copies are issued at ~160
//    cycles each, but smaller groups free ring slots for refills sooner).
//  - Grouped (progressive, G = 64 or 128): w8 = q*s2 + z2 with z2 = -z*s2 (int8). w8 + 128 = q*s2 + (z2 + 128)
//    lies in [0, 255] for every byte, so one 32-bit multiply-add on 4 packed bytes has no carries, and XOR 0x80 per
//    byte gives the int8 (csrc/w4a8/common.cuh, Level2). The s2 word of lane g holds channels g, g+8, g+16, g+24
//    of the 32-channel block (QServe's [4,8] -> [8,4] reorder), i.e. rows g, g+8 (low) and g+16, g+24 (high).
//  - Pipelining (CfgLarge, CfgMid): per k32 step: wgmma.fence, 2 wgmmas, commit, then ld.shared + unpack of the
//    next step's weights (overlapping the running wgmmas), then wait_group 1 (the previous step retired: its A
//    registers are free and, at a stage's first step, the previous stage is released to the producer). CfgSmall
//    unpacks a whole stage and issues its 8 wgmmas as one group, double-buffered across stages (two register sets,
//    wait_group 1); per channel it feeds the low nibbles and the whole bytes (lo + 16 hi) as u8 A operands and
//    recovers the high-nibble sums after the k loop (one AND per register instead of three operations: the same
//    warps issue the unpacking and the wgmmas, and it does not overlap them). It requests its epilogue scales
//    (channels and tokens) before its k loop. Persistent grid (one CTA per SM, tiles strided by the grid, m
//    fastest): the producer prefetches the next tile's stages during the epilogue. Consumers get 232 registers
//    (setmaxnreg), the producer warpgroup 40.
//  - Programmatic dependent launch: the kernel may start while the previous kernel in
//    the stream (the activation quantization) finishes; the producer requests the first ring's weights before
//    griddepcontrol.wait, the activations and token scales are read only after it. Safe because only kernels
//    that never write weights (quant_act, this GEMM) trigger their dependents early; any other predecessor
//    triggers implicitly when it completes.
//  - Numerics: psum is the exact int32 sum (s8 x s8 -> s32 tensor-core accumulation). Epilogue per output in
//    QServe's instruction order (common.cuh, qserve_epilogue_f): per channel fp16(fma(as, fl(s1 * float(psum)),
//    -fl(sz * asum))), groups fp16(fl(float(psum) * fl(s1 * as))), the same chain as the mma.sync kernels and the
//    CPU reference (dcc/targets/qserve/numerics.py), bit for bit. Unsplit outputs go through shared memory for
//    16-byte coalesced stores; tokens >= M are masked (the TMA load fills rows past M with zeros).
//  - Split-K (few output tiles): S in {2, 4, 8} (16-token tile: 2..8) CTAs per output tile form a thread-block
//    cluster (grid.y); CTA rank r writes the outputs of consumer warps [8r/S, 8(r+1)/S), the sum of the S CTAs'
//    int32 partials of those warps (integer: order-independent). 16-token tile: the other CTAs push their partials
//    into the owner's receive region (st.shared::cluster) before one cluster barrier; larger tiles: each CTA keeps
//    them in its ring, and the owners read them over distributed shared memory between two barriers. No global
//    workspace, no arrival counters. S
//    (choose_splits_cfg): the largest with tiles * S <= SMs, every cluster resident at once
//    (cudaOccupancyMaxActiveClusters), and >= 4 (CfgLarge, CfgMid) or >= 2 (CfgSmall) k stages per split.
// Requirements (gemm_wgmma_supported): sm_90a device code present, N % 256 == 0, K % 128 == 0, group 0/64/128;
// any M >= 1 (per channel at M <= 16: K <= 65536). gemm_wgmma_preferred: where the automatic choice takes it.
// Override (tests and benchmarks; the family's one knob, csrc/w4a8/DESIGN.md): DCC_W4A8_WGMMA="splits=S,tile=T"
// forces S (1..8, where the GPU can run it) and, for M > 16, the token tile T (64: CfgMid, 128: CfgLarge).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <cuda.h>   // CUtensorMap and the cuTensorMapEncodeTiled prototype only; resolved at run time
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"   // ldg_h, ld_h
#include "w4a8.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "wgmma_ptx.cuh"
#define DCC_WGMMA_DEVICE 1
#endif
namespace dcc_w4a8 {
namespace {

#include "wgmma_kernel.cuh"

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

template <int kGroup, class C, int kMode>
bool set_smem_mode() {
  return cudaFuncSetAttribute(w4a8_wgmma_kernel<kGroup, C, kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              C::kSmemBytes) == cudaSuccess;
}

template <int kGroup, class C>
bool set_smem() {
  return set_smem_mode<kGroup, C, kPersistent>() && set_smem_mode<kGroup, C, kCluster>();
}

template <int kGroup>
bool kernel_ready() {
  // The sm_90a body exists only where it was compiled for sm_90a; a stub has (almost) no registers. Also raises
  // the kernels' shared-memory limits once.
  static int ready = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaFuncAttributes a{};
    ready = 0;
    if (cudaFuncGetAttributes(&a, w4a8_wgmma_kernel<kGroup, CfgLarge, kPersistent>) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (a.binaryVersion < 90 || a.numRegs < 64) return;
    if (!set_smem<kGroup, CfgLarge>() || !set_smem<kGroup, CfgMid>() || !set_smem<kGroup, CfgSmall>()) {
      cudaGetLastError();
      return;
    }
    if (encode_fn() == nullptr) return;
    ready = 1;
  });
  return ready == 1;
}

bool ready_for(int group) {
  if (device_major() != 9) return false;
  switch (group) {
    case 0: return kernel_ready<0>();
    case 64: return kernel_ready<64>();
    case 128: return kernel_ready<128>();
    default: return false;
  }
}

constexpr int kTileN = CfgLarge::kTileN, kTileK = CfgLarge::kTileK;   // every configuration
static_assert(CfgMid::kTileN == kTileN && CfgSmall::kTileN == kTileN && CfgMid::kTileK == kTileK &&
                  CfgSmall::kTileK == kTileK, "one channel tile and k stage for every configuration");
constexpr int kSmallMaxM = CfgSmall::kTok;   // M <= 16: CfgSmall

// The value of `key` in DCC_W4A8_WGMMA ("splits=S,tile=T"), -1 where it is not set. Read at every call, so that a
// test can change it between calls (a getenv and a short scan: nothing next to a kernel launch).
int wgmma_override(const char* key) {
  const size_t n = std::strlen(key);
  for (const char* s = std::getenv("DCC_W4A8_WGMMA"); s != nullptr; s = std::strchr(s, ',')) {
    if (*s == ',') ++s;
    if (std::strncmp(s, key, n) == 0 && s[n] == '=') return std::atoi(s + n + 1);
  }
  return -1;
}

template <class C>
int tiles_of(int M, int N) { return ((M + C::kTok - 1) / C::kTok) * (N / kTileN); }

// CfgMid (64-token tiles) where CfgLarge's tiles would occupy fewer than half the SMs, for 16 < M <= 64, or up to
// M = 256 where K <= 8192: twice the CTAs per layer (or, where clusters run short, fewer k stages per split's
// reduction) and less tensor work on partial tiles; else CfgLarge. At K = 14336, M = 128, the 64-token tiles get
// no more CTAs (the GPU holds too few clusters of 4) and each streams twice the weights (DESIGN.md).
// DCC_W4A8_WGMMA="tile=64" / "tile=128" forces CfgMid / CfgLarge for every M > 16.
bool use_mid(int M, int N, int K) {
  const int tile = wgmma_override("tile");
  if (tile == 64 || tile == 128) return tile == 64;
  return (M <= 64 || (M <= 256 && K <= 8192)) && 2 * tiles_of<CfgLarge>(M, N) < num_sms();
}

// Launch configuration: a cluster of `cluster` CTAs along y where > 1; programmatic dependent launch (the kernel
// prefetches weights while the previous kernel in the stream finishes) unless pdl is false. attr: 2 entries.
template <class C>
cudaLaunchConfig_t launch_config(dim3 grid, int cluster, bool pdl, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = C::kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (cluster > 1) {
    attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attr[cfg.numAttrs].val.clusterDim.x = 1;
    attr[cfg.numAttrs].val.clusterDim.y = cluster;
    attr[cfg.numAttrs].val.clusterDim.z = 1;
    ++cfg.numAttrs;
  }
  if (pdl) {
    attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
    ++cfg.numAttrs;
  }
  return cfg;
}

// Clusters of S CTAs (one per SM) the GPU holds at once; 0 where it cannot run them (cached per configuration).
template <class C>
int max_clusters(int S) {
  static int cache[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};   // S = 1..8
  const int slot = S;
  if (cache[slot] < 0) {
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = launch_config<C>(dim3(1, S), S, false, nullptr, attr);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, w4a8_wgmma_kernel<0, C, kCluster>, &cfg) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    cache[slot] = n;
  }
  return cache[slot];
}

// K splits = cluster size S (DESIGN.md): the largest with tiles * S <= SMs, every tile's cluster
// resident at once, and >= 2 (CfgSmall, which only streams weights) or >= 4 (CfgLarge) k stages per split. S is a
// power of two (2, 4, 8) except on the 16-token tile, which only streams weights and takes any S <= 8: the H200
// holds only 15 clusters of 8 one-SM CTAs, so a layer of 16 tiles (4096 channels) fell from S = 8 to 4 (64 SMs);
// now it takes the largest S whose 16 clusters fit (6 on the H200, 96 SMs; inferred: fewer than 16 clusters of 7
// fit).
// DCC_W4A8_WGMMA="splits=S" forces S in 1..8 where the GPU can run it.
template <class C>
int choose_splits_cfg(int M, int N, int K) {
  const int kt = K / kTileK, tiles = tiles_of<C>(M, N);
  {
    const int s = wgmma_override("splits");
    if (s == 1) return 1;
    if (s >= 2 && s <= 8 && s <= kt && tiles * s <= num_sms() && max_clusters<C>(s) > 0) return s;
  }
  const bool any_s = C::kTok <= 16;
  const int min_stages = any_s ? 2 : 4;
  int best = 1;
  for (int s = 2; s <= 8; s = any_s ? s + 1 : 2 * s) {
    if (kt / s < min_stages || tiles * s > num_sms()) break;
    if (max_clusters<C>(s) >= tiles) best = s;
    else if (!any_s) break;
  }
  return best;
}

bool shape_ok(int M, int N, int K, int group) {
  if (M < 1 || N < kTileN || K < kTileK || N % kTileN || K % kTileK) return false;
  if (group != 0 && group != 64 && group != 128) return false;
  if (static_cast<long long>(M) * K >= (1LL << 40)) return false;
  if (group == 0 && M <= kSmallMaxM && K > 65536) return false;   // the 16-token tile's whole-byte sums fit int32
  const long long tiles = static_cast<long long>((M + kSmallMaxM - 1) / kSmallMaxM) * (N / kTileN);
  return tiles <= 0x7FFFFFFF;
}

template <class C>
cudaError_t launch(WgParams p, cudaStream_t stream) {
  CUtensorMap tmap;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.K), static_cast<cuuint64_t>(p.M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.K)};
  const cuuint32_t box[2] = {C::kTileK, C::kTok};
  const cuuint32_t estr[2] = {1, 1};
  if (encode_fn()(&tmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(p.xq), dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;
  p.num_m_tiles = (p.M + C::kTok - 1) / C::kTok;
  p.S = choose_splits_cfg<C>(p.M, p.N, p.K);
  // split: one tile per CTA, a cluster of S CTAs per tile; else a persistent grid (at most one CTA per SM; the
  // producer prefetches the next tile during the epilogue)
  const int tiles = tiles_of<C>(p.M, p.N);
  const int ctas = p.S > 1 || tiles < num_sms() ? tiles : num_sms();
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = launch_config<C>(dim3(ctas, p.S), p.S, true, stream, attr);
  if (p.S > 1) {
    switch (p.group) {
      case 0: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<0, C, kCluster>, tmap, p);
      case 64: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<64, C, kCluster>, tmap, p);
      default: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<128, C, kCluster>, tmap, p);
    }
  }
  switch (p.group) {
    case 0: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<0, C, kPersistent>, tmap, p);
    case 64: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<64, C, kPersistent>, tmap, p);
    default: return cudaLaunchKernelEx(&cfg, w4a8_wgmma_kernel<128, C, kPersistent>, tmap, p);
  }
}

}  // namespace

size_t gemm_wgmma_workspace(int, int, int, int) {
  return 0;   // split-K reduces over distributed shared memory: no global scratch
}

bool gemm_wgmma_supported(int M, int N, int K, int group) {
  return shape_ok(M, N, K, group) && ready_for(group);
}

bool gemm_wgmma_preferred(int M, int N, int K, int group) {
  if (!gemm_wgmma_supported(M, N, K, group)) return false;
  // M <= 16 where the cluster GEMV (gemm_gemv.cu) runs (measured on the H200, DESIGN.md): it wins on latency-bound
  // layers (4096x4096) at every M <= 16 and on every layer at M < 8 (grouped since its warps take whole groups,
  // g128 at M = 1: 4096x14336 12.3-12.7 us against 14.0-14.4 here, 14336x4096 12.3-12.7 against 12.3-12.5); this
  // kernel's bulk streaming wins on the large layers from M = 8 (14336x4096 at M = 8: 10.0 against 10.9 us per
  // channel, 12.4 against 13.9 g128).
  if (M <= kSmallMaxM && gemm_gemv_available() && (latency_bound_layer(N, K) || M < 8)) return false;
  if (M >= 8) return true;
  // Where the cluster GEMV is not built: at M < 8 both kernels only stream weights; the wgmma kernel's per-CTA
  // stream (one producer thread's bulk copies) reaches the DRAM rate only with most SMs streaming, which the
  // mma.sync split-K kernel's many small CTAs get at any shape. From M = 8 the mma.sync kernel's time grows with M
  // and the wgmma kernel's does not (measured on the H200: DESIGN.md).
  const int ctas = tiles_of<CfgSmall>(M, N) * choose_splits_cfg<CfgSmall>(M, N, K);
  return 10 * ctas >= 7 * num_sms();   // else the split-K kernel
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
  p.xq = static_cast<const int8_t*>(xq);
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
  p.group = group;
  (void)workspace;
  (void)ws_bytes;
  if (M <= kSmallMaxM) return launch<CfgSmall>(p, stream);
  if (use_mid(M, N, K)) return launch<CfgMid>(p, stream);
  return launch<CfgLarge>(p, stream);
}

}  // namespace dcc_w4a8
