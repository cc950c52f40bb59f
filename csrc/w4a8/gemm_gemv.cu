// Cluster GEMV: the W4A8 kernel for M <= 16 on Hopper (sm_90: thread-block clusters, programmatic dependent launch).
//
// At M <= 16 the GEMM only streams weights (4096x4096: 8.4 MB), and a kernel that reads that little from DRAM is
// bound by latency, not bandwidth: a pure read of 8.4 MB takes 3.6 us at best on an H200 (2.3 TB/s; 29.4 MB: 8.2 us,
// 3.6 TB/s; csrc/w4a8/DESIGN.md), and every load that waits for an earlier one to return adds another ~2 us. So the
// kernel is built to have all of its weight loads in flight at once, in one wave of CTAs:
//  - "swap AB" on mma.sync m16n8k32 (as the split-K kernel): a lane's 16 bytes of a 32x32 qweight tile are the A
//    fragments of two 16-row slabs; tokens are the B operand (8 per mma, MT = 1 or 2 groups).
//  - CTA = kRows 32-channel row tiles x a K range; warp w takes row tile w % kRows and every (kWarps/kRows)-th k
//    tile of the range from w / kRows, with kU tiles in flight in registers (weights and s2 words): with kU >= the
//    warp's tiles, every weight load of the CTA is issued before the first mma. Grouped weights go by whole groups
//    (K ranges split at group boundaries, a warp's tiles in runs of one group) so that one pair of s2 / z2 loads
//    serves 2 (g64) or 4 (g128) tiles: with one pair per tile the grouped kernel was 1.2-1.8x the per-channel one
//    at M = 1 (4096x14336: 15.8 against 10.5 us; now 12.3-12.7; H200).
//  - Activations: at M <= 8 a lane's two activation words per tile (token g) can be loaded with its weights. At
//    8 < M <= 16 they would be four loads per 16-byte weight load (4096x4096: 6.9 us at M = 16 against 4.2 at
//    M = 1), and on latency-bound layers even two cost time from M = 5 (token_groups below), so the CTA's slice
//    (M rows x its K range) is staged in shared memory by one bulk copy per row, issued after the weight loads,
//    and B fragments come from there (one ldmatrix.x4 per tile; rows padded by 16 bytes: conflict-free). Every
//    32-channel CTA reads the whole slice, so at M = 16 the activations read from L2 equal the weights
//    (4096x4096: 8 MB); shapes with C = 2 pair the CTAs of two row blocks in a cluster and multicast each row to
//    both (half the L2 reads: 6.6 -> 5.5 us). Clusters of 4 would halve it again, but the H200 holds only 30
//    clusters of 4 one-CTA-per-SM CTAs (120 SMs), so 128 CTAs take two waves.
//  - Few-token timeline (8 < M <= 16, one round of weights in registers; H200, 4096x4096, M = 16: 5.46 -> 4.61-4.78
//    us, DESIGN.md): the warps unpack their weight tiles while the activation slice is in flight, tokens 0-7 and
//    8-15 land on separate mbarriers so that the first half's mma work starts before the second half is in, the
//    warps' partial sums are added into one [row tile][token][row] buffer by shared-memory atomics (not stored per
//    warp and re-read 16 times per output), no step after the k loop divides by a runtime value, and the output
//    phase of the common case (S = 1) is straight code. The activation rows, requested after the dependency wait,
//    land with the end of the weight stream (they share the L2 -> SM path), so what follows them sets the call time.
//    Per channel, the 16-warp 8-tile CTAs are held to 64 registers so that two fit an SM: the next call's CTA then
//    streams its weights beside this one's wait and tail (4.61-4.78 -> 3.94-4.10 us; gemv_kernel.cuh, min_ctas).
//  - Split-K: S CTAs of a row block form a cluster (S x C with shared activations); each writes 1/S of the
//    outputs, and the others push their int32 sums of those into its shared memory (st.shared::cluster) before one
//    cluster barrier; it adds them (integer: the same bits in any order). No remote loads, no global workspace.
//    The pushes need every CTA of the cluster running: the cluster barrier at the start where C > 1, else a
//    relaxed arrive at the start (a release one would wait for the weight loads in flight) and its wait just
//    before the pushes.
//  - Programmatic dependent launch: the weight (and s2) loads are issued before griddepcontrol.wait, the
//    activations, token scales and outputs only after it (the previous kernel, quant_act, writes the activations).
//  - Epilogue: common.cuh's exact epilogue (epilogue_fast: one float fma where |psum| < 2^22, as the wgmma kernel;
//    the same bits as the split-K kernel and the CPU reference up to a double-rounding tie). Its scales are copied
//    into shared memory by cp.async when the kernel starts (channels at once, tokens after the dependency wait),
//    so that their DRAM latency overlaps the weight stream (gemv_kernel.cuh, scales_aligned).
// The block shape and S come from choose() below (measured on an H200; DESIGN.md). gemm_mma_kernel kind 4.
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "gemv_kernel.cuh"

namespace dcc_w4a8 {
namespace {

using gemv::gemv_kernel;

// Block shapes (warps, tiles in flight per warp, row tiles per CTA, CTAs sharing the activations where they are
// staged); variant v of kind 4 is kShapes[v - 1]. Where the activations are not staged a shape runs with C = 1.
struct Shape {
  int warps, ring, rows, C;
};
constexpr Shape kShapes[] = {{16, 8, 1, 1}, {16, 4, 1, 1}, {8, 4, 1, 1}, {8, 8, 1, 1}, {4, 8, 1, 1},
                             {16, 8, 4, 1}, {16, 4, 4, 1}, {16, 8, 1, 2}, {16, 4, 1, 2}, {16, 4, 4, 2}};
constexpr int kNumShapes = sizeof(kShapes) / sizeof(kShapes[0]);
static_assert(kNumShapes <= 15, "variant bits 4-7 of the kernel code");

using KernelFn = void (*)(GemmArgs);

// gt: k tiles per group (0 per channel, 2 for g64, 4 for g128)
template <int MT, int W, int U, int R, int C>
KernelFn pick_gt(int gt) {
  if (gt == 0) return gemv_kernel<MT, 0, W, U, R, C>;
  return gt == 2 ? gemv_kernel<MT, 2, W, U, R, C> : gemv_kernel<MT, 4, W, U, R, C>;
}

template <int W, int U, int R, int C>
KernelFn pick_fn(int MT, int gt) {
  return MT == 1 ? pick_gt<1, W, U, R, 1>(gt) : pick_gt<2, W, U, R, C>(gt);
}

template <int I>
KernelFn kernel_at(int shape, int MT, int gt) {
  if constexpr (I < kNumShapes) {
    constexpr Shape sh = kShapes[I];
    if (shape == I) return pick_fn<sh.warps, sh.ring, sh.rows, sh.C>(MT, gt);
    return kernel_at<I + 1>(shape, MT, gt);
  } else {
    return nullptr;
  }
}

KernelFn kernel_of(int shape, int MT, int gt) { return kernel_at<0>(shape, MT, gt); }

// MT: 1 where the lanes load their activation words with their weights, 2 where the CTA stages its activation
// slice in shared memory: M > 8 (one token per lane no longer covers them), and on latency-bound layers from M = 5
// (H200, 4096x4096 per channel at M = 5 / 8: 4.75 / 5.20 us loaded, 4.43 / 4.45 staged; at M <= 4 neither wins
// everywhere). On larger layers staging loses below 9 (14336x4096 at M = 5: 10.5 loaded, 13.3 staged): every
// 32-channel CTA reads the whole slice from L2, traffic that a bandwidth-bound layer pays for in time.
int token_groups(int M, int N, int K) { return M > 8 || (M > 4 && latency_bound_layer(N, K)) ? 2 : 1; }

// CTAs of a cluster that share the staged activations (multicast)
int share_of(int shape, int MT) { return MT == 2 ? kShapes[shape].C : 1; }

cudaLaunchConfig_t config(dim3 grid, int threads, int S, int C, bool pdl, cudaStream_t stream,
                          cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.stream = stream;
  cfg.attrs = attr;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = S;
  attr[0].val.clusterDim.y = C;
  attr[0].val.clusterDim.z = 1;
  cfg.numAttrs = 1;
  if (pdl) {
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 2;
  }
  return cfg;
}

// The k tiles a warp takes in a run (the kernel's kG): a group's tiles where grouped (gt), else one.
int unit_of(int gt) { return gt > 0 ? gt : 1; }

// k tiles of the longest of S K ranges: grouped weights split at group boundaries (gt tiles per group)
int range_tiles(int K, int S, int gt) {
  const int unit = unit_of(gt), units = K / 32 / unit;
  return (units + S - 1) / S * unit;
}

// Dynamic shared memory of a launch: the M activation rows of the longest K range where they are staged.
int smem_bytes(int MT, int M, int K, int S, int gt) {
  return MT == 2 ? M * gemv::slice_stride(range_tiles(K, S, gt)) : 0;
}
constexpr int kMaxSmem = 160 * 1024;   // bound on the staged activation slice (the GPU allows ~227 KB)

// CTAs (S == C == 1) or CTAs in clusters of S x C the GPU holds at once for a kernel with `smem` dynamic bytes;
// the kernel's shared-memory limit is raised on first use.
int resident_ctas(KernelFn fn, int threads, int S, int C, int smem) {
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  int n = 0;
  if (S * C == 1) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, threads, smem) != cudaSuccess) n = 0;
    n *= num_sms();
  } else {
    cudaLaunchAttribute attr[2];
    cudaLaunchConfig_t cfg = config(dim3(S, C), threads, S, C, false, nullptr, attr);
    cfg.dynamicSmemBytes = smem;
    if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) != cudaSuccess) n = 0;
    n *= S * C;
  }
  cudaGetLastError();
  return n;
}

struct Choice {
  int shape, S;
};

// Ranking of a feasible (shape, S), smaller is better (measured on an H200, DESIGN.md): one wave of CTAs first (a
// second wave waits a whole DRAM round trip); then every weight load of a warp issued at once (one round of its
// ring), with the fewest splits; else the most warps per SM (each warp consumes its tiles in order, so the warps
// streaming side by side set the rate), then the fewest rounds and splits; then the most CTAs sharing the
// activations. Infeasible: rank.waves < 0.
struct Rank {
  long long waves;
  int multi_round, warps_neg, rounds, S, share_neg;
  bool operator<(const Rank& o) const {
    return std::tie(waves, multi_round, warps_neg, rounds, S, share_neg) <
           std::tie(o.waves, o.multi_round, o.warps_neg, o.rounds, o.S, o.share_neg);
  }
};

Rank rank(int shape, int S, int M, int N, int K, int gt) {
  const Shape& sh = kShapes[shape];
  const int MT = token_groups(M, N, K), unit = unit_of(gt), C = share_of(shape, MT);
  const int smem = smem_bytes(MT, M, K, S, gt);
  const Rank bad{-1, 0, 0, 0, 0, 0};
  if (N % (32 * sh.rows * C) || S > K / 32 / unit || S * C > 8 || smem > kMaxSmem) return bad;
  const long long ctas = 1LL * S * (N / 32 / sh.rows);
  const int resident = resident_ctas(kernel_of(shape, MT, gt), sh.warps * 32, S, C, smem);
  if (resident <= 0) return bad;
  const long long waves = (ctas + resident - 1) / resident;
  const int wk = sh.warps / sh.rows;
  const int units = range_tiles(K, S, gt) / unit;   // of the longest split; a warp takes every wk-th unit
  const int rounds = ((units + wk - 1) / wk * unit + sh.ring - 1) / sh.ring;
  const long long warps_per_sm = 1000LL * (ctas < resident ? ctas : resident) * sh.warps / num_sms();
  if (rounds == 1) return {waves, 0, 0, 1, S, -C};
  return {waves, 1, -static_cast<int>(warps_per_sm), rounds, S, -C};
}

Choice choose_uncached(int M, int N, int K, int gt, int force_shape, int force_s) {
  Choice best{-1, 0};
  Rank best_rank{};
  for (int shape = 0; shape < kNumShapes; ++shape) {
    if (force_shape >= 0 && shape != force_shape) continue;
    for (int S = 1; S <= 8; S *= 2) {
      if (force_s > 0 && S != force_s) continue;
      const Rank r = rank(shape, S, M, N, K, gt);
      if (r.waves >= 0 && (best.shape < 0 || r < best_rank)) {
        best = {shape, S};
        best_rank = r;
      }
    }
  }
  return best;
}

// The choice per call signature, cached: the occupancy queries behind it cost tens of microseconds of host time.
Choice choose(int M, int N, int K, int gt, int force_shape, int force_s) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int, int>, Choice> cache;
  const auto key = std::make_tuple(M, N, K, gt, force_shape, force_s);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, choose_uncached(M, N, K, gt, force_shape, force_s)).first;
  return it->second;
}

}  // namespace

bool gemm_gemv_available() {
  static int ok = -1;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaFuncAttributes a{};
    ok = device_major() >= 9 && cudaFuncGetAttributes(&a, gemv_kernel<1, 0, 16, 8, 1, 1>) == cudaSuccess &&
         a.binaryVersion >= 90 && a.numRegs >= 16;   // a stub (compiled for an older target) has almost no registers
    cudaGetLastError();
  });
  return ok == 1;
}

int gemv_max_m() { return 16; }

cudaError_t launch_gemv(const GemmArgs& args, cudaStream_t stream, int variant, int force_s) {
  if (!gemm_gemv_available()) return cudaErrorNotSupported;
  if (args.M < 1 || args.M > gemv_max_m() || variant < 0 || variant > kNumShapes || force_s < 0 || force_s > 8 ||
      (force_s & (force_s - 1)))
    return cudaErrorInvalidValue;
  const int gt = args.group / 32;   // k tiles per group (group 0, 64 or 128: gemm_mma_kernel checked it)
  const Choice c = choose(args.M, args.N, args.K, gt, variant - 1, force_s);
  if (c.shape < 0) return cudaErrorInvalidValue;   // a forced shape or S the layer or the GPU cannot take
  GemmArgs p = args;
  p.S = c.S;
  const Shape& sh = kShapes[c.shape];
  const int MT = token_groups(p.M, p.N, p.K);
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = config(dim3(c.S, p.N / 32 / sh.rows), sh.warps * 32, c.S, share_of(c.shape, MT),
                                  true, stream, attr);
  cfg.dynamicSmemBytes = smem_bytes(MT, p.M, p.K, c.S, gt);
  return cudaLaunchKernelEx(&cfg, kernel_of(c.shape, MT, gt), p);
}

}  // namespace dcc_w4a8
