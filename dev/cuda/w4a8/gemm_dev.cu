// gemm_dev_kernel (dev.h): the benchmark-only kernels by code, with the product's argument checks (make_gemm_args).
#include "dev.h"
#include "dev_kernels.cuh"

namespace dcc_w4a8 {

cudaError_t gemm_dev_kernel(int kernel, const void* xq, const void* ascale, const void* asum, const void* qweight,
                            const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                            void* out, int M, int N, int K, int group, void* workspace, size_t ws_bytes,
                            cudaStream_t stream) {
  const int kind = kernel & 0xF, shape = (kernel >> 4) & 0xF, force_s = kernel >> 8;
  if (kind != 1 && kind != 3)
    return gemm_mma_kernel(kernel, xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, out, M, N,
                           K, group, workspace, ws_bytes, stream);
  if (kernel < 0 || (kind == 1 && M > splitk_max_m())) return cudaErrorInvalidValue;
  if (kind == 3 && (M > kStreamkMaxM || N > kStreamkMaxN || shape >= kNumStreamkVariants)) return cudaErrorInvalidValue;
  GemmArgs p{};
  const cudaError_t e = make_gemm_args(p, xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, out,
                                       M, N, K, group);
  if (e != cudaSuccess || M == 0) return e;
  if (kind == 3) return launch_streamk(p, workspace, ws_bytes, stream, shape);
  return launch_splitk_shape(shape, p, workspace, ws_bytes, stream, force_s);
}

size_t gemm_dev_kernel_workspace(int kernel, int M, int N, int K, int group) {
  const int kind = kernel & 0xF;
  if (kind == 3) return kStreamkWorkspace;
  if (kind == 1) return splitk_shape_workspace((kernel >> 4) & 0xF, M, N, K, group, kernel >> 8);
  return gemm_mma_kernel_workspace(kernel, M, N, K, group);
}

}  // namespace dcc_w4a8
