// W4A8 GEMM for small M (weight-bandwidth bound): "swap AB" -- out^T = W . X^T with the weights as the mma A
// operand, read straight from the QServe layout (one 16-byte load per lane per 32x32 tile is the A fragment of
// two 16-row slabs), and 8 tokens per mma as the B operand from a shared-memory copy of the CTA's K slice.
// Grid: (N/32 row tiles, S splits of K, token chunks of 8*MT). Each warp of a CTA takes every W-th 32-wide k tile of
// the CTA's slice with a U-deep ring of weight loads in flight; the warps' int32 sums are added in shared memory, and
// the S splits through int32 slots in the workspace, summed by the tile's last CTA (exact, so deterministic).
// The kernel template is in gemm_splitk.cuh; this file holds the two block shapes the product launches -- the default
// (8 warps, 4 tiles in flight) and the wide one, kSplitkWideShape (16 warps, 8 tiles, M <= 16), which gemm_mma's
// tuned choice takes at M <= 8 where the cluster GEMV does not run -- and the choice of S. The numbers 0 and 4 are
// those of the measured block-shape table (DESIGN.md); dev/cuda/w4a8 holds the other shapes.
#include <algorithm>
#include <cstdint>

#include "gemm_splitk.cuh"

namespace dcc_w4a8 {
namespace {

using splitk::max_slice_tiles;

constexpr int kWarps = 8, kRing = 4;            // the default shape (0)
constexpr int kWideWarps = 16, kWideRing = 8;   // kSplitkWideShape

int mt_for(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : 4; }

int max_tiles(int MT) { return MT == 1 ? max_slice_tiles<1>() : MT == 2 ? max_slice_tiles<2>() : max_slice_tiles<4>(); }

// Splits of K: minimise (waves of CTAs) x (k tiles per CTA + a fixed cost per CTA, in tile units), with the slice
// fitting the shared-memory bound; ties go to fewer splits (less reduction traffic).
int choose_splits(int N, int K, int chunks, int slots, int tmax, int warps) {
  const int ktiles = K / 32, tiles_n = N / 32;
  if (1LL * tiles_n * chunks > kMaxCounters) return std::max(1, (ktiles + tmax - 1) / tmax);
  int best = ktiles, best_cost = 1 << 30;
  for (int s = 1; s <= ktiles; ++s) {
    const int per = (ktiles + s - 1) / s;
    if (per > tmax) continue;
    const long long ctas = 1LL * tiles_n * s * chunks;
    const int waves = static_cast<int>((ctas + slots - 1) / slots);
    const int cost = waves * (per + 2 * warps);
    if (cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

int default_occupancy(int MT, bool grouped) {
  using namespace splitk;
  switch (MT) {
    case 1: return grouped ? occupancy<1, true, kWarps, kRing>() : occupancy<1, false, kWarps, kRing>();
    case 2: return grouped ? occupancy<2, true, kWarps, kRing>() : occupancy<2, false, kWarps, kRing>();
    default: return grouped ? occupancy<4, true, kWarps, kRing>() : occupancy<4, false, kWarps, kRing>();
  }
}

int wide_occupancy(int MT, bool grouped) {
  using namespace splitk;
  constexpr int W = kWideWarps, U = kWideRing;
  if (MT == 1) return grouped ? occupancy<1, true, W, U>() : occupancy<1, false, W, U>();
  return grouped ? occupancy<2, true, W, U>() : occupancy<2, false, W, U>();
}

// S for (M, N, K) under block shape `variant` (0 or kSplitkWideShape).
int splits(int M, int N, int K, int group, int variant, int force_s) {
  const int MT = mt_for(M);
  const bool wide = variant == kSplitkWideShape;
  const int occ = wide ? wide_occupancy(MT, group > 0) : default_occupancy(MT, group > 0);
  return splitk_splits(M, N, K, occ, wide ? kWideWarps : kWarps, force_s);
}

}  // namespace

int splitk_splits(int M, int N, int K, int occupancy, int warps, int force_s) {
  const int MT = mt_for(M), ktiles = K / 32;
  const int smin = (ktiles + max_tiles(MT) - 1) / max_tiles(MT);
  if (force_s > 0) return std::min(ktiles, std::max(force_s, smin));
  return choose_splits(N, K, (M + 8 * MT - 1) / (8 * MT), occupancy * num_sms(), max_tiles(MT), warps);
}

int splitk_variant_occupancy(int variant, int MT, bool grouped) {
  if (variant == 0) return default_occupancy(MT, grouped);
  return variant == kSplitkWideShape && MT <= 2 ? wide_occupancy(MT, grouped) : 1;
}

int splitk_max_m() { return 32; }

int splitk_slice_tiles(int M) { return max_tiles(mt_for(M)); }

size_t splitk_workspace(int M, int N, int K, int group, int variant, int force_s) {
  if (M <= 0 || N <= 0 || K <= 0 || (variant != 0 && variant != kSplitkWideShape)) return 0;
  const int S = splits(M, N, K, group, variant, force_s);
  return S == 1 ? 0 : kSlotsOffset + static_cast<size_t>(S) * M * N * 4;
}

cudaError_t launch_splitk(const GemmArgs& args, void* workspace, size_t ws_bytes, cudaStream_t stream, int variant,
                          int force_s) {
  using namespace splitk;
  GemmArgs p = args;
  if ((variant != 0 && variant != kSplitkWideShape) || (variant > 0 && p.M > 16)) return cudaErrorInvalidValue;
  p.S = splits(p.M, p.N, p.K, p.group, variant, force_s);
  if (p.S > 1) {
    if (!workspace || ws_bytes < splitk_workspace(p.M, p.N, p.K, p.group, variant, force_s))
      return cudaErrorInvalidValue;
    p.counters = static_cast<uint32_t*>(workspace);
    p.slots = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + kSlotsOffset);
  }
  const bool grouped = p.group > 0;
  if (variant == kSplitkWideShape) {
    constexpr int W = kWideWarps, U = kWideRing;
    if (p.M <= 8) return grouped ? launch<1, true, W, U>(p, stream) : launch<1, false, W, U>(p, stream);
    return grouped ? launch<2, true, W, U>(p, stream) : launch<2, false, W, U>(p, stream);
  }
  switch (mt_for(p.M)) {
    case 1: return grouped ? launch<1, true, kWarps, kRing>(p, stream) : launch<1, false, kWarps, kRing>(p, stream);
    case 2: return grouped ? launch<2, true, kWarps, kRing>(p, stream) : launch<2, false, kWarps, kRing>(p, stream);
    default: return grouped ? launch<4, true, kWarps, kRing>(p, stream) : launch<4, false, kWarps, kRing>(p, stream);
  }
}

}  // namespace dcc_w4a8
