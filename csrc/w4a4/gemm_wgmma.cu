// Hopper (sm_90a) W4A4 GEMM on wgmma for Nunchaku INT4 layers: the fast path of csrc/w4a4/gemm.cu, same numerics,
// bit for bit (csrc/w4a4/DESIGN.md).
//
// Design:
//  - Operands as stored one 4-bit code per byte (int8 weight codes [N, K], int8 activation codes [M, K]): both are
//    valid s8 wgmma operands (unsigned after-GELU codes 0..15 included), K-major, loaded by 2D TMA with the 128-byte
//    swizzle and read by wgmma from shared memory (m64nNk32 s8.s8 -> s32; A = 64 weight channels, B = N tokens).
//    Scales as fp32, group-major: wscales_t [K/64, N] (made once per layer: the exact fp32 values of the 16-bit
//    scales) and ascales_t [K/64, ld >= M, ld % 16 == 0] (written by quant_act next to its 16-bit scales, tokens
//    permuted within 16-token blocks: tok_pos in wgmma_kernel.cuh), one 2D TMA box each; a thread's 4 token scales
//    of two accumulator column blocks are one 16-byte shared-memory load. Positions >= M are never written: they
//    only reach the accumulators of tokens >= M, whose outputs are dropped.
//  - CTA: 3 warpgroups. Consumer warpgroup w (w = 0, 1) owns a whole output tile of 64 channels x kTok tokens
//    (kTok = 128, or 64 where that needs fewer rounds of tiles: gemm_wgmma_tile) and its own shared-memory ring
//    (3 / 5 stages of 128 k = two 64-k groups); warp 8 + w of the producer warpgroup (one thread) fills ring w. The two
//    consumers run independently, so one's CUDA-core work (group folding, epilogue) overlaps the other's wgmmas.
//    Persistent grid: min(SMs, tiles) CTAs, warpgroup w of CTA b takes tiles b + w * grid + j * 2 * grid, m
//    fastest (tiles running at once share weight rows in L2). Programmatic dependent launch: the producers request
//    the first ring's weights before griddepcontrol.wait, the activations after; consumers wait at their start.
//    Safe because the only kernel that triggers its dependents early is quant_act (at its start), whose outputs
//    are read after the wait; any other predecessor triggers implicitly when it completes. Registers: consumers
//    232 (setmaxnreg), producer 40.
//  - Per 64-k group: two wgmmas (the first with scale-d = 0, so the int32 accumulators start from the group's own
//    sum), wait, then per output acc = fma(float(psum), fl32(ascale * wscale), acc) with __fmaf_rn / __fmul_rn,
//    groups in k order, acc from +0 -- common.cuh group_step, the step of the mma.sync kernel and of the CPU
//    emulation (dcc/targets/nunchaku/cuda_numerics.py group_accumulate). psum is exact (integer), float(psum) exact
//    (|psum| < 2^13), so the outputs are bit-identical to gemm.cu's.
//  - Epilogue per warpgroup: acc = fl32(acc + bias[n]), then for r in order acc = fma(lora_act[m, r], up[n, r],
//    acc) (lora_act and lora_up staged in shared memory, 32 ranks per pass), one RNE to 16 bits, the tile staged in
//    shared memory and written with 16-byte stores; tokens >= M are dropped (their TMA rows were zero-filled).
// Requirements (gemm_wgmma_supported): an sm_90 GPU and the sm_90a body compiled; N % 64 == 0, K % 128 == 0,
// K <= 2^20; 16-byte aligned codes, scales (ld % 16 == 0) and output. Override (tests, benchmarks):
// DCC_W4A4_WGMMA="tile=64|128,cvt=0|1" forces the token tile and the int -> float conversion (read per call).
// Variant (fp8 = 1): the codes stored as e4m3 bytes (every 4-bit code is an exact e4m3 value; quant_act writes
// them, the weights are converted once), wgmma m64nNk32 f32.e4m3.e4m3: the accumulators hold float(psum) itself,
// which saves the conversion per output and group -- exact as long as the tensor cores' fp32 accumulation of
// these small integers is (products <= 120, sums < 2^13); the tests compare it bit for bit.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <cuda.h>   // CUtensorMap and the cuTensorMapEncodeTiled prototype only; resolved at run time
#include <cuda_runtime.h>

#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "sm90_ptx.cuh"
#define DCC_W4A4_WGMMA_DEVICE 1
#endif

namespace dcc_w4a4 {

int device_attr(cudaDeviceAttr a) {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, a, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

namespace {

#include "wgmma_kernel.cuh"
#include "wgmma2_kernel.cuh"
#include "wgmma3_kernel.cuh"
#include "wgmma4_kernel.cuh"

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

template <class T, int kTok, int kCvt>
bool prepare_one() {
  auto k = w4a4_wgmma_kernel<T, kTok, kCvt>;
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, k) != cudaSuccess) return false;
  if (a.binaryVersion < 90 || a.numRegs < 64) return false;   // the stub of a non-sm_90a build
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, WgCfg<kTok>::kSmemBytes) ==
         cudaSuccess;
}

template <class T, int kCvt, int kMc>
bool prepare_two() {
  auto k = w4a4_wgmma2_kernel<T, kCvt, kMc>;
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, k) != cudaSuccess || a.binaryVersion < 90 || a.numRegs < 64) return false;
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, Wg2Cfg::kSmemBytes) == cudaSuccess;
}

template <class Kernel>
bool prepare_kernel(Kernel k, int smem) {
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, k) != cudaSuccess || a.binaryVersion < 90 || a.numRegs < 64) return false;
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess;
}

template <class T, bool kTc>
bool prepare_three() {
  return prepare_kernel(w4a4_wgmma3_kernel<T, kTc>, Wg3Cfg<kTc>::kSmemBytes) &&
         (kTc || prepare_kernel(w4a4_wgmma4_kernel<T>, Wg3Cfg<false>::kSmemBytes));
}

template <class T>
bool prepare_all() {
  return prepare_one<T, 128, 0>() && prepare_one<T, 128, 1>() && prepare_one<T, 128, 2>() &&
         prepare_one<T, 64, 0>() && prepare_one<T, 64, 1>() && prepare_one<T, 64, 2>() && prepare_two<T, 0, 0>() &&
         prepare_two<T, 1, 0>() && prepare_two<T, 2, 0>() && prepare_two<T, 0, 1>() && prepare_two<T, 1, 1>() &&
         prepare_two<T, 2, 1>() && prepare_three<T, false>() && prepare_three<T, true>();
}

// The sm_90a bodies exist (this GPU is sm_90 and the module was built for sm_90a), their shared-memory limits are
// raised, and the tensor-map encoder resolved; checked once per process (the current device at the first call).
bool ready() {
  static int state = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    state = 0;
    if (device_attr(cudaDevAttrComputeCapabilityMajor) != 9) return;
    const bool ok = prepare_all<__half>() && prepare_all<__nv_bfloat16>();
    cudaGetLastError();
    if (ok && encode_fn() != nullptr) state = 1;
  });
  return state == 1;
}

// The value of `key` in DCC_W4A4_WGMMA ("tile=T,cvt=C"), -1 where it is not set.
int override_of(const char* key) {
  const size_t n = std::strlen(key);
  for (const char* s = std::getenv("DCC_W4A4_WGMMA"); s != nullptr; s = std::strchr(s, ',')) {
    if (*s == ',') ++s;
    if (std::strncmp(s, key, n) == 0 && s[n] == '=') return std::atoi(s + n + 1);
  }
  return -1;
}

bool shape_ok(int M, int N, int K) {
  return M >= 1 && N >= 64 && N % 64 == 0 && K >= 128 && K % 128 == 0 && K <= (1 << 20) &&
         static_cast<long long>(M) * K < (1LL << 40) && (static_cast<long long>(M) + 63) / 64 * (N / 64) < (1LL << 30);
}

bool encode(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t inner, uint64_t outer,
            uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swz) {
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t estr[2] = {1, 1};
  return encode_fn()(map, type, 2, const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The launch configuration both kernels share: a persistent grid, programmatic dependent launch (the kernel may
// start while quant_act, which triggers its dependents as it starts, finishes; it prefetches weights and reads
// activations only after griddepcontrol.wait).
template <int kThreads = kWgThreads, class Kernel, class... Args>
cudaError_t launch_persistent(Kernel kernel, int ctas, int smem, int cluster, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = cluster;
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <class T, int kTok, int kCvt>
cudaError_t launch(const void* acodes, const void* ascales_t, int ld, const void* wcodes, const void* wscales_t,
                   WgArgs p, cudaStream_t stream) {
  using C = WgCfg<kTok>;
  const int G = p.K / kGroup;
  CUtensorMap tw, ta, tws, tas;
  if (!encode(&tw, CU_TENSOR_MAP_DATA_TYPE_UINT8, wcodes, p.K, p.N, p.K, C::kTileK, C::kCh,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, acodes, p.K, p.M, p.K, C::kTileK, kTok,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&tws, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, wscales_t, p.N, G, static_cast<uint64_t>(p.N) * 4, C::kCh, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !encode(&tas, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, ascales_t, ld, G, static_cast<uint64_t>(ld) * 4, kTok, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  p.num_m_tiles = (p.M + kTok - 1) / kTok;
  p.num_tiles = p.num_m_tiles * (p.N / C::kCh);
  const int sms = device_attr(cudaDevAttrMultiProcessorCount);
  // one CTA per SM at most; warpgroup slot blockIdx.x + w * grid, so with fewer tiles than twice the SMs every SM
  // gets one tile before any gets a second
  const int ctas = std::max(1, std::min(sms > 0 ? sms : 132, p.num_tiles));
  return launch_persistent(w4a4_wgmma_kernel<T, kTok, kCvt>, ctas, C::kSmemBytes, 1, stream, tw, ta, tws, tas, p);
}

// How many CTA pairs of the multicast kernel can be resident at once (a persistent grid must not exceed it: pairs
// are placed within a GPC, so not every SM need be usable); SMs / 2 where the query fails. Once per type.
template <class T, int kCvt>
int max_pairs() {
  static int pairs = 0;
  static std::once_flag once;
  std::call_once(once, [] {
    const int sms = device_attr(cudaDevAttrMultiProcessorCount);
    pairs = (sms > 0 ? sms : 132) / 2;
    cudaLaunchConfig_t cfg{};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(2 * pairs);
    cfg.blockDim = dim3(kWgThreads);
    cfg.dynamicSmemBytes = Wg2Cfg::kSmemBytes;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, w4a4_wgmma2_kernel<T, kCvt, 1>, &cfg) == cudaSuccess && n > 0)
      pairs = std::min(pairs, n);
    cudaGetLastError();
  });
  return pairs;
}

// The second kernel (wgmma2_kernel.cuh): 128-channel x 128-token CTA tiles, TMA-fed low-rank epilogue; kMc: CTA
// pairs sharing (multicasting) the activation codes.
template <class T, int kCvt, int kMc>
cudaError_t launch2(const void* acodes, const void* ascales_t, int ld, const void* wcodes, const void* wscales_t,
                    WgArgs p, cudaStream_t stream) {
  using C = Wg2Cfg;
  const int G = p.K / kGroup;
  CUtensorMap tw, ta, tws, tas, tla{}, tup{};
  if (!encode(&tw, CU_TENSOR_MAP_DATA_TYPE_UINT8, wcodes, p.K, p.N, p.K, C::kTileK, C::kCh,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, acodes, p.K, p.M, p.K, C::kTileK, kMc ? C::kTok / 2 : C::kTok,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&tws, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, wscales_t, p.N, G, static_cast<uint64_t>(p.N) * 4, C::kCh, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !encode(&tas, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, ascales_t, ld, G, static_cast<uint64_t>(ld) * 4, C::kTok, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  // lora_act [M, R] fp32 rows in 32-rank boxes, 128-byte swizzled; lora_up [N, R] 16-bit, 32-rank boxes
  if (p.R > 0 &&
      (!encode(&tla, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.lora_act, p.R, p.M, static_cast<uint64_t>(p.R) * 4,
               C::kRank, C::kTok, CU_TENSOR_MAP_SWIZZLE_128B) ||
       !encode(&tup, CU_TENSOR_MAP_DATA_TYPE_UINT16, p.lora_up, p.R, p.N, static_cast<uint64_t>(p.R) * 2, C::kRank,
               C::kCh, CU_TENSOR_MAP_SWIZZLE_NONE)))
    return cudaErrorInvalidValue;
  p.num_m_tiles = (p.M + C::kTok - 1) / C::kTok;
  p.num_tiles = p.num_m_tiles * (p.N / C::kCh / (kMc ? 2 : 1));   // kMc: tile pairs
  const int sms = device_attr(cudaDevAttrMultiProcessorCount);
  const int ctas = kMc ? 2 * std::max(1, std::min(max_pairs<T, kCvt>(), p.num_tiles))
                       : std::max(1, std::min(sms > 0 ? sms : 132, p.num_tiles));
  return launch_persistent(w4a4_wgmma2_kernel<T, kCvt, kMc>, ctas, C::kSmemBytes, kMc ? 2 : 1, stream, tw, ta, tws,
                           tas, tla, tup, p);
}

// The third kernel (wgmma3_kernel.cuh): the second kernel's tiles, fp8 operands, the main loop pipelined within each
// warpgroup; kTc: the low-rank branch on the tensor cores from lora_up's fp32 copy (not bit-identical).
template <class T, bool kTc>
cudaError_t launch3(const void* acodes, const void* ascales_t, int ld, const void* wcodes, const void* wscales_t,
                    const void* lora_up_f32, WgArgs p, cudaStream_t stream, bool quadrants = false) {
  using C = Wg3Cfg<kTc>;
  const int G = p.K / kGroup;
  CUtensorMap tw, ta, tws, tas, tla{}, tup{};
  if (!encode(&tw, CU_TENSOR_MAP_DATA_TYPE_UINT8, wcodes, p.K, p.N, p.K, C::kTileK, C::kCh,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&ta, CU_TENSOR_MAP_DATA_TYPE_UINT8, acodes, p.K, p.M, p.K, C::kTileK, C::kTok,
              CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode(&tws, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, wscales_t, p.N, G, static_cast<uint64_t>(p.N) * 4, C::kCh, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !encode(&tas, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, ascales_t, ld, G, static_cast<uint64_t>(ld) * 4, C::kTok, 2,
              CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  // lora_act [M, R] fp32 in 32-rank boxes, 128-byte swizzled; lora_up [N, R]: its fp32 copy, 128-byte swizzled (the
  // wgmma A operand, kTc), or the 16-bit values in plain 64-byte rows (the fma chain)
  if (p.R > 0 &&
      (!encode(&tla, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, p.lora_act, p.R, p.M, static_cast<uint64_t>(p.R) * 4,
               C::kRank, C::kTok, CU_TENSOR_MAP_SWIZZLE_128B) ||
       !(kTc ? encode(&tup, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, lora_up_f32, p.R, p.N, static_cast<uint64_t>(p.R) * 4,
                      C::kRank, C::kCh, CU_TENSOR_MAP_SWIZZLE_128B)
             : encode(&tup, CU_TENSOR_MAP_DATA_TYPE_UINT16, p.lora_up, p.R, p.N, static_cast<uint64_t>(p.R) * 2,
                      C::kRank, C::kCh, CU_TENSOR_MAP_SWIZZLE_NONE))))
    return cudaErrorInvalidValue;
  p.num_m_tiles = (p.M + C::kTok - 1) / C::kTok;
  p.num_tiles = p.num_m_tiles * (p.N / C::kCh);
  const int sms = device_attr(cudaDevAttrMultiProcessorCount);
  const int ctas = std::max(1, std::min(sms > 0 ? sms : 132, p.num_tiles));
  if constexpr (!kTc) {
    if (quadrants)   // the fourth kernel: the same tiles and layout, four consumer warpgroups
      return launch_persistent<kWg4Threads>(w4a4_wgmma4_kernel<T>, ctas, C::kSmemBytes, 1, stream, tw, ta, tws, tas,
                                            tla, tup, p);
  }
  return launch_persistent(w4a4_wgmma3_kernel<T, kTc>, ctas, C::kSmemBytes, 1, stream, tw, ta, tws, tas, tla, tup,
                           p);
}

template <class T, int kTok>
cudaError_t dispatch_cvt(int cvt, const void* acodes, const void* ascales_t, int ld, const void* wcodes,
                         const void* wscales_t, const WgArgs& p, cudaStream_t stream) {
  switch (cvt) {
    case 1: return launch<T, kTok, 1>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
    case 2: return launch<T, kTok, 2>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
    default: return launch<T, kTok, 0>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
  }
}

template <class T, int kMc>
cudaError_t dispatch2_cvt(int cvt, const void* acodes, const void* ascales_t, int ld, const void* wcodes,
                          const void* wscales_t, const WgArgs& p, cudaStream_t stream) {
  switch (cvt) {
    case 1: return launch2<T, 1, kMc>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
    case 2: return launch2<T, 2, kMc>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
    default: return launch2<T, 0, kMc>(acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
  }
}

template <class T>
cudaError_t dispatch2(int mc, int cvt, const void* acodes, const void* ascales_t, int ld, const void* wcodes,
                      const void* wscales_t, const WgArgs& p, cudaStream_t stream) {
  return mc ? dispatch2_cvt<T, 1>(cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream)
            : dispatch2_cvt<T, 0>(cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
}

template <class T>
cudaError_t dispatch(int tile, int cvt, const void* acodes, const void* ascales_t, int ld, const void* wcodes,
                     const void* wscales_t, const WgArgs& p, cudaStream_t stream) {
  return tile == 64 ? dispatch_cvt<T, 64>(cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream)
                    : dispatch_cvt<T, 128>(cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
}

}  // namespace

bool gemm_wgmma_supported(int M, int N, int K) { return shape_ok(M, N, K) && ready(); }

int gemm_wgmma_tile(int M, int N) {
  const int forced = override_of("tile");
  if (forced == 64 || forced == 128) return forced;
  // Rounds of tiles over the grid's 2 x SMs consumer warpgroups times the work of a tile (a 64-token tile taken as
  // 0.55 of a 128-token one: the same per-group overheads on half the outputs). Estimated, not yet measured: M = 256
  // and 1024 at N = 3072 get 64 (fewer idle warpgroups in the last round), M >= 4096 gets 128.
  const int sms = device_attr(cudaDevAttrMultiProcessorCount);
  const long long slots = 2LL * (sms > 0 ? sms : 132);
  const long long t128 = (static_cast<long long>(M) + 127) / 128 * (N / 64);
  const long long t64 = (static_cast<long long>(M) + 63) / 64 * (N / 64);
  const long long cost128 = 100 * ((t128 + slots - 1) / slots), cost64 = 55 * ((t64 + slots - 1) / slots);
  return cost64 < cost128 ? 64 : 128;
}

int gemm_wgmma_kernel(int M, int N, int R) {
  if (N % 128 != 0 || R % 32 != 0) return 1;   // the second kernel's shape rules
  const int forced = override_of("kernel");
  if (forced >= 1 && forced <= 4) return forced;   // 3, 4: fp8 operands only (s8 calls take the second kernel)
  // Where its 128 x 128 tiles fill every SM, (M + 127) / 128 * (N / 128) >= SMs (FLUX.1 at M >= 1024). H100, first
  // run (DESIGN.md): without CTA pairs it took every FLUX.1 row at M = 1024 and 4096 from the first kernel's fp8
  // 71-820 us to 55-624 us (1.03-1.52x); with pairs it was slower than the first kernel.
  const int sms = device_attr(cudaDevAttrMultiProcessorCount);
  return (static_cast<long long>(M) + 127) / 128 * (N / 128) >= (sms > 0 ? sms : 132) ? 2 : 1;
}

cudaError_t gemm_wgmma(const void* acodes, const void* ascales_t, int ld, const void* wcodes, const void* wscales_t,
                       const void* bias, const void* lora_act, const void* lora_up, void* out, int M, int N, int K,
                       int R, int dtype, int fp8, cudaStream_t stream, int lora_tc, const void* lora_up_f32) {
  if (!shape_ok(M, N, K) || R < 0 || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  if (!ready()) return cudaErrorNotSupported;
  if (!acodes || !ascales_t || !wcodes || !wscales_t || !out || ld < M || ld % 16) return cudaErrorInvalidValue;
  if (R > 0 && (!lora_act || !lora_up)) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(acodes) | reinterpret_cast<uintptr_t>(ascales_t) |
       reinterpret_cast<uintptr_t>(wcodes) | reinterpret_cast<uintptr_t>(wscales_t) |
       reinterpret_cast<uintptr_t>(out)) & 15)
    return cudaErrorInvalidValue;
  WgArgs p{bias, static_cast<const float*>(lora_act), lora_up, out, M, N, K, R, 0, 0};
  const int cvt = fp8 ? 2 : override_of("cvt") == 1 ? 1 : 0;
  const bool epi_aligned = R == 0 || ((reinterpret_cast<uintptr_t>(lora_act) | reinterpret_cast<uintptr_t>(lora_up) |
                                       reinterpret_cast<uintptr_t>(lora_up_f32)) & 15) == 0;
  // the third kernel (fp8 only), with the low rank on the tensor cores (tc) or the CUDA cores
  auto k3 = [&](bool tc, bool quadrants = false) {
    if (dtype == 0)
      return tc ? launch3<__half, true>(acodes, ascales_t, ld, wcodes, wscales_t, lora_up_f32, p, stream)
                : launch3<__half, false>(acodes, ascales_t, ld, wcodes, wscales_t, nullptr, p, stream, quadrants);
    return tc ? launch3<__nv_bfloat16, true>(acodes, ascales_t, ld, wcodes, wscales_t, lora_up_f32, p, stream)
              : launch3<__nv_bfloat16, false>(acodes, ascales_t, ld, wcodes, wscales_t, nullptr, p, stream, quadrants);
  };
  if (lora_tc) {   // the third kernel with the low rank on the tensor cores (at R = 0: the third kernel)
    if (!fp8 || N % 128 != 0 || R % 32 != 0 || !epi_aligned || (R > 0 && !lora_up_f32)) return cudaErrorInvalidValue;
    return k3(R > 0);
  }
  const int kernel = gemm_wgmma_kernel(M, N, R);
  if ((kernel == 3 || kernel == 4) && fp8 && epi_aligned) return k3(false, kernel == 4);
  if (kernel >= 2 && epi_aligned) {
    // CTA pairs multicasting the activations only where DCC_W4A4_WGMMA="mc=1" asks (and N % 256 == 0): measured
    // slower than one CTA loading its own (H100: 3072x3072 M = 4096 fp8 241 against 157 us)
    const int mc = N % 256 == 0 && override_of("mc") == 1;
    return dtype == 0 ? dispatch2<__half>(mc, cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream)
                      : dispatch2<__nv_bfloat16>(mc, cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
  }
  const int tile = gemm_wgmma_tile(M, N);
  return dtype == 0 ? dispatch<__half>(tile, cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream)
                    : dispatch<__nv_bfloat16>(tile, cvt, acodes, ascales_t, ld, wcodes, wscales_t, p, stream);
}

}  // namespace dcc_w4a4
