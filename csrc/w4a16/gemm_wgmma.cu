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
// Override (tests and benchmarks): DCC_W4A16_WGMMA_CFG="tile=T,splits=S,sets=3,rot=1,gsplit=1" forces the token tile
// (64, 128, 256), S, three A register sets instead of two (measured no faster: DESIGN.md), per-tile rotated k loops,
// and split-K through global memory (partials and a per-tile counter: the last CTA sums them in split order) instead
// of the cluster, which lets S grow past the clusters the GPU holds at once.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
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

// The global split-K workspace of (device, stream): partials for SMs x 256 tokens x 128 channels (tiles x S <= SMs,
// choose_splits) and a counter per tile, zero between launches (each launch leaves its counters zero). Per stream:
// two streams' GEMMs never share one. Made on the stream's first global split, in relaxed capture mode so that this
// also works inside a CUDA-graph capture: cudaMalloc, and the counters zeroed on a private stream that is waited
// for, so they are zero before any launch or replay (nothing is recorded into the graph). Kept for the process.
struct Workspace {
  float* part = nullptr;
  unsigned* counters = nullptr;
};

Workspace* workspace(cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, Workspace> all;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  Workspace& w = all[{dev, stream}];
  if (w.part == nullptr) {
    const int sms = num_sms();
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    cudaStream_t side = nullptr;
    cudaError_t e = cudaMalloc(&w.part, static_cast<size_t>(sms) * 256 * kTileN * sizeof(float));
    if (e == cudaSuccess) e = cudaMalloc(&w.counters, sms * sizeof(unsigned));
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMemsetAsync(w.counters, 0, sms * sizeof(unsigned), side);
    if (e == cudaSuccess) e = cudaStreamSynchronize(side);
    if (side != nullptr) cudaStreamDestroy(side);
    if (e != cudaSuccess) {
      cudaFree(w.part);
      cudaFree(w.counters);
      w = Workspace{};
    }
    cudaThreadExchangeStreamCaptureMode(&mode);
    check_cuda(e, "wgmma GEMM split-K workspace");
  }
  return &w;
}

// K splits S (a power of two <= 8): the largest with tiles * S <= SMs, at least 8 k stages per split, S dividing
// the stage count, and every tile's cluster resident at once. DCC_W4A16_WGMMA_CFG="splits=S" forces S where valid.
// global: the splits meet in global memory (no cluster), so only tiles x S <= SMs bounds S.
template <class C>
int choose_splits(int tiles, int K, bool global) {
  const int kt = K / kTileK;
  const auto valid = [&](int s) {
    return kt % s == 0 && (s == 1 || (global ? tiles * s <= num_sms() : max_clusters<C>(s) > 0));
  };
  const int forced = cfg_override("splits");
  if ((forced == 1 || forced == 2 || forced == 4 || forced == 8) && valid(forced)) return forced;
  int best = 1;
  for (int s = 2; s <= 8; s *= 2) {
    if (kt / s < 8 || kt % s || tiles * s > num_sms() || (!global && max_clusters<C>(s) < tiles)) break;
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
  // DCC_W4A16_WGMMA_CFG="gsplit=1": the K splits meet in global memory instead of a cluster's shared memory
  const bool global = cfg_override("gsplit") == 1;
  p.S = choose_splits<C>(tiles, p.K, global);
  p.kt_split = p.K / kTileK / p.S;
  p.rotate = cfg_override("rot") == 1;
  if (global && p.S > 1) {
    const Workspace* w = workspace(stream);
    p.part = w->part;
    p.counters = w->counters;
  }
  if (splits_out != nullptr) *splits_out = p.S;
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(tiles, p.S), C::kSmemBytes, p.part ? 1 : p.S, stream, attr);
  // DCC_W4A16_WGMMA_CFG="sets=3": three A register sets, two stage groups in flight (no faster: DESIGN.md)
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

int gemm_wgmma_tile(int M, int N) {
  const int forced = cfg_override("tile");
  if (forced == 64 || forced == 128 || forced == 256) return forced;
  if (M <= 64) return 64;
  // 256-token tiles where 128-token ones take a second wave of SMs and 256-token ones fit one (14336 x 4096 at
  // M = 256 on an H100: 224 tiles against 112 on 132 SMs, 48.7 us against 76.9; where both fit in one wave, the
  // 128-token tiles and their K splits were faster: 4096^2 and 4096 x 14336 at M = 256, DESIGN.md)
  if (M > 128 && N > 0 && ready()) {
    const int sms = num_sms(), n_tiles = N / kTileN;
    if (((M + 127) / 128) * n_tiles > sms && ((M + 255) / 256) * n_tiles <= sms) return 256;
  }
  return 128;
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
  const int tile = gemm_wgmma_tile(M, N);
  if (tile == 64) run(CfgMid());
  else if (tile == 128) run(CfgLarge());
  else run(CfgWide());
  return splits;
}

}  // namespace dcc_w4a16
