// Tile configurations, kernel parameters and the work split of the Hopper W4A8 GEMM (included by wgmma_kernel.cuh,
// inside namespace dcc_w4a8 and its anonymous namespace; host and device code use them).
#pragma once

template <int kTok_, int kStages_, int kWGroup_ = 1>
struct WgCfg {
  static constexpr int kTok = kTok_;                 // tokens per CTA tile (the wgmma N)
  static constexpr int kStages = kStages_;
  // Stages whose weights one bulk copy per 32-channel block brings (kWGroup x 2 KB: a block's k tiles are
  // contiguous). 1: the weights live in the stage; > 1: in a separate region [8 blocks][kStages][2 KB], so that
  // kWGroup consecutive ring slots of a block are contiguous.
  static constexpr int kWGroup = kWGroup_;
  static constexpr int kTileN = 256;                 // output channels per CTA (2 consumer warpgroups x 128)
  static constexpr int kTileK = 128;                 // k per pipeline stage
  static constexpr int kActBytes = kTok * kTileK;    // 128B-swizzled [kTok tokens][128 k]
  static constexpr int kWBytes = kTileN * kTileK / 2;   // 16 KB: [8 channel blocks][4 k tiles][512 B]
  static constexpr int kS2Off = kActBytes + (kWGroup == 1 ? kWBytes : 0);   // s2 region (2 KB) in the stage
  static constexpr int kStageBytes = kS2Off + 2048;   // a multiple of 1024 (SW128 base)
  static constexpr int kWRegionBytes = kWGroup == 1 ? 0 : kStages * kWBytes;
  static constexpr int kEpiStride = 128 + 8;         // halves per token row of a warpgroup's output tile
  static constexpr int kEpiBytes = 2 * kTok * kEpiStride * 2;
  static constexpr int kScaleBytes = 2 * 2 * kTok * (8 + 4);   // per warpgroup: ascale, asum as float (after 8 bytes per value once used for doubles)
  static constexpr int kBarBytes = 2 * kStages * 8 + 16;
  // few tokens: the split-K receive region, (S - 1) x ceil(8 / S) slots of 2 KB (at most 12, at S = 7)
  static constexpr int kRecvBytes = kTok <= 16 ? 12 * 2048 : 0;
  static constexpr int kSmemBytes =
      1024 + kStages * kStageBytes + kWRegionBytes + kEpiBytes + kScaleBytes + kBarBytes + kRecvBytes;
  static_assert(kStageBytes % 1024 == 0, "stage alignment");
  static_assert(kStages % kWGroup == 0, "weight groups tile the ring");
  static_assert(kSmemBytes <= 232448, "shared memory");
};
using CfgLarge = WgCfg<128, 4>;
using CfgMid = WgCfg<64, 6>;
using CfgSmall = WgCfg<16, 8, 2>;   // 4 KB weight copies (two stages per 32-channel block)
constexpr int kThreads = 384;      // 2 consumer warpgroups + 1 producer warpgroup (one thread issues the copies)

// Kernel parameters: common.cuh's GemmArgs (the kernel reads the activations through the tensor map built from xq,
// not xq itself; S = the K splits = cluster size, 1..8, split z taking k stages [z*KT/S, (z+1)*KT/S); slots and
// counters unused) and the number of token tiles.
struct WgParams : GemmArgs {
  int num_m_tiles;
};

// How the CTAs share the work: kPersistent (tiles strided over a persistent grid, whole K per tile) or kCluster
// (split-K over the S CTAs of a cluster, one tile per CTA, reduction over distributed shared memory).
enum WgMode { kPersistent = 0, kCluster = 1 };

// The (tile, k range) pieces of one CTA's work, in order: k stages [kb, kb + len) of tile `tile`. Producer and
// consumers walk the same sequence (the producer's first ring may span several tiles).
struct Segments {
  int tile, kb, len, num_tiles;
  __device__ __forceinline__ Segments(const WgParams& p, int num_tiles_) : num_tiles(num_tiles_) {
    const int kt_all = p.K / CfgLarge::kTileK, split = blockIdx.y;   // every configuration's k stage
    kb = split * kt_all / p.S;
    len = (split + 1) * kt_all / p.S - kb;   // >= 1
    tile = blockIdx.x;
  }
  __device__ __forceinline__ bool valid() const { return tile < num_tiles; }
  __device__ __forceinline__ void next() { tile += gridDim.x; }
};
