// Benchmark-only block shapes of the split-K kernel (M <= 16): (warps per CTA, weight tiles in flight per warp),
// numbered as in the measured table of csrc/w4a8/DESIGN.md. Shapes 0 and 4 are the product's (gemm_splitk.cu); the
// others are instantiated here from the product's kernel template, with S chosen by the product's rule.
#include "dev_kernels.cuh"
#include "gemm_splitk.cuh"

namespace dcc_w4a8 {
namespace {

constexpr int kShapes[kNumSplitkShapes][2] = {{8, 4}, {8, 8}, {4, 8}, {16, 4}, {16, 8}, {4, 4}};

bool product_shape(int shape) { return shape == 0 || shape == kSplitkWideShape; }

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

int occupancy_of(int shape, int M, bool grouped) {
  const int MT = M <= 8 ? 1 : 2;
  switch (shape) {
    case 1: return occ<8, 8>(MT, grouped);
    case 2: return occ<4, 8>(MT, grouped);
    case 3: return occ<16, 4>(MT, grouped);
    case 5: return occ<4, 4>(MT, grouped);
    default: return 1;
  }
}

int splits_of(int shape, int M, int N, int K, int group, int force_s) {
  return splitk_splits(M, N, K, occupancy_of(shape, M, group > 0), kShapes[shape][0], force_s);
}

}  // namespace

size_t splitk_shape_workspace(int shape, int M, int N, int K, int group, int force_s) {
  if (product_shape(shape)) return splitk_workspace(M, N, K, group, shape, force_s);
  if (shape < 0 || shape >= kNumSplitkShapes || M <= 0 || M > 16) return 0;
  const int S = splits_of(shape, M, N, K, group, force_s);
  return S == 1 ? 0 : kSlotsOffset + static_cast<size_t>(S) * M * N * 4;
}

cudaError_t launch_splitk_shape(int shape, const GemmArgs& args, void* workspace, size_t ws_bytes, cudaStream_t stream,
                                int force_s) {
  if (product_shape(shape)) return launch_splitk(args, workspace, ws_bytes, stream, shape, force_s);
  if (shape < 0 || shape >= kNumSplitkShapes || args.M > 16) return cudaErrorInvalidValue;
  GemmArgs p = args;
  p.S = splits_of(shape, p.M, p.N, p.K, p.group, force_s);
  if (p.S > 1) {
    if (!workspace || ws_bytes < splitk_shape_workspace(shape, p.M, p.N, p.K, p.group, force_s))
      return cudaErrorInvalidValue;
    p.counters = static_cast<uint32_t*>(workspace);
    p.slots = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + kSlotsOffset);
  }
  switch (shape) {
    case 1: return run<8, 8>(p, stream);
    case 2: return run<4, 8>(p, stream);
    case 3: return run<16, 4>(p, stream);
    case 5: return run<4, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dcc_w4a8
