// Benchmark-only block shapes of the split-K kernel (M <= 16): (warps per CTA, weight tiles in flight per warp).
// Variant 0 is the default (8, 4) in gemm_splitk.cu; bench/gpu_w4a8.py --sweep times these against it.
#include "gemm_splitk.cuh"

namespace dcc_w4a8 {
namespace {

constexpr int kShapes[kNumSplitkVariants][2] = {{8, 4}, {8, 8}, {4, 8}, {16, 4}, {16, 8}, {4, 4}};

template <int W, int U>
cudaError_t run(const GemmArgs& p, cudaStream_t stream) {
  using namespace splitk;
  const bool g = p.group > 0;
  if (p.M <= 8) return g ? launch<1, true, W, U>(p, stream) : launch<1, false, W, U>(p, stream);
  return g ? launch<2, true, W, U>(p, stream) : launch<2, false, W, U>(p, stream);
}

template <int W, int U>
int occ(int MT, bool g) {
  using namespace splitk;
  if (MT == 1) return g ? occupancy<1, true, W, U>() : occupancy<1, false, W, U>();
  return g ? occupancy<2, true, W, U>() : occupancy<2, false, W, U>();
}

}  // namespace

int splitk_variant_warps(int variant) { return kShapes[variant][0]; }

int splitk_variant_occupancy(int variant, int MT, bool grouped) {
  switch (variant) {
    case 1: return occ<8, 8>(MT, grouped);
    case 2: return occ<4, 8>(MT, grouped);
    case 3: return occ<16, 4>(MT, grouped);
    case 4: return occ<16, 8>(MT, grouped);
    case 5: return occ<4, 4>(MT, grouped);
    default: return 1;
  }
}

cudaError_t launch_splitk_variant(int variant, const GemmArgs& p, cudaStream_t stream) {
  switch (variant) {
    case 1: return run<8, 8>(p, stream);
    case 2: return run<4, 8>(p, stream);
    case 3: return run<16, 4>(p, stream);
    case 4: return run<16, 8>(p, stream);
    case 5: return run<4, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dcc_w4a8
