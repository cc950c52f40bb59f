// Host API of the benchmark-only W4A8 kernels (dev/cuda/w4a8, module dcc_w4a8_dev; not part of the installed
// runtime): the split-K kernel's block shapes other than the product's two, and the persistent stream-K kernel, both
// measured slower than what the product dispatches (csrc/w4a8/DESIGN.md, "variants measured and dropped"). Built
// together with the product's mma.sync sources (csrc/w4a8), whose pointer conventions (w4a8.h) they take.
#pragma once

#include <cstddef>

#include "w4a8.h"

namespace dcc_w4a8 {

// Kernel codes as gemm_mma_kernel's: kernel & 0xF = 1 split-K with block shape (kernel >> 4) & 0xF in 0..5 (0 and
// 4 are the product's) and forced splits kernel >> 8; 3 stream-K with block shape 0..3 (M <= 16, N <= 65536); any
// other code is passed on to the product's gemm_mma_kernel. The stream-K workspace must not be shared with the
// split-K kernels (its accumulators overlap their slots); each must be zero before its first use.
cudaError_t gemm_dev_kernel(int kernel, const void* xq, const void* ascale, const void* asum, const void* qweight,
                            const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                            void* out, int M, int N, int K, int group, void* workspace, size_t ws_bytes,
                            cudaStream_t stream);
size_t gemm_dev_kernel_workspace(int kernel, int M, int N, int K, int group);

}  // namespace dcc_w4a8
