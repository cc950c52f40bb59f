// Hopper (sm_90a) wgmma W4A8 GEMM: placeholder until the wgmma kernel lands (it replaces this file). Every entry
// point reports "not supported", so callers fall back to the mma.sync kernel (gemm_mma).
#include "w4a8.h"

namespace dcc_w4a8 {

cudaError_t gemm_wgmma(const void*, const void*, const void*, const void*, const void*, const void*, const void*,
                       const void*, void*, int, int, int, int, void*, size_t, cudaStream_t) {
  return cudaErrorNotSupported;
}

size_t gemm_wgmma_workspace(int, int, int, int) { return 0; }

bool gemm_wgmma_supported(int, int, int, int) { return false; }

}  // namespace dcc_w4a8
