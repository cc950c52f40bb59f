// Device-side declarations of the benchmark-only W4A8 kernels (dev.h has the host API): the split-K kernel's other
// block shapes (gemm_splitk_variants.cu) and the persistent stream-K kernel (gemm_streamk.cu), which share the
// product's GemmArgs, workspace layout and split-K template (csrc/w4a8/common.cuh, gemm_splitk.cuh).
#pragma once

#include <cstddef>

#include "common.cuh"

namespace dcc_w4a8 {

// Split-K block shapes by number (warps per CTA, weight tiles in flight per warp): 0 = (8, 4) and 4 = (16, 8) are the
// product's (gemm_splitk.cu, forwarded there); 1 = (8, 8), 2 = (4, 8), 3 = (16, 4), 5 = (4, 4) live here; all but 0
// take M <= 16. force_s > 0: that many K splits. Workspace: the product's layout (counters, then slots).
constexpr int kNumSplitkShapes = 6;
size_t splitk_shape_workspace(int shape, int M, int N, int K, int group, int force_s);
cudaError_t launch_splitk_shape(int shape, const GemmArgs& p, void* workspace, size_t ws_bytes, cudaStream_t stream,
                                int force_s);

// Stream-K kernel (gemm_streamk.cu): M <= kStreamkMaxM, N <= kStreamkMaxN; variant: block shape 0..3. Its workspace
// (kStreamkWorkspace bytes: arrival counters, then int32 accumulators of kStreamkMaxM x kStreamkMaxN) must be zero
// before the first call and is left zero by every call; it must not be shared with the split-K kernels, whose slots
// overlap the accumulators.
constexpr int kStreamkMaxM = 16, kStreamkMaxN = 65536, kNumStreamkVariants = 4;
constexpr size_t kStreamkWorkspace =
    kCounterBytes + static_cast<size_t>(kStreamkMaxM) * kStreamkMaxN * sizeof(int32_t);
cudaError_t launch_streamk(const GemmArgs& p, void* workspace, size_t ws_bytes, cudaStream_t stream, int variant);

}  // namespace dcc_w4a8
