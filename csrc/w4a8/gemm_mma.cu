// gemm_mma: argument checks and the choice among the mma.sync kernels: the cluster GEMV (M <= 16 on sm_90+), the
// split-K kernel (small M elsewhere) and the tiled multistage kernel (larger M). All read the QServe checkpoint
// tensors as stored. The dispatch table and its measurements: DESIGN.md.
#include <cstdint>

#include "common.cuh"

namespace dcc_w4a8 {

int num_sms() {
  static int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) !=
                                                  cudaSuccess)
      return 132;
    return n > 0 ? n : 132;
  }();
  return sms;
}

int device_major() {
  static int major = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                  cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return v;
  }();
  return major;
}

namespace {

// Where the cluster GEMV does not run: split-K kernel for M <= this, tiled kernel above (H100, DESIGN.md).
constexpr int kSplitkAutoMaxM = 16;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// kernel code: bits 0-3 kind (0 auto, 1 split-K, 2 tiled, 4 GEMV; 3 was the stream-K kernel, now in dev/cuda/w4a8),
// bits 4-7 variant (block shape), bits 8+ forced split count (split-K, GEMV). pick: the kind, auto resolved by M:
// the cluster GEMV at M <= 16 where the GPU runs it (sm_90+), else the split-K or the tiled kernel.
int pick(int kernel, int M) {
  const int kind = kernel & 0xF;
  if (kind != 0) return kind;
  if (M <= gemv_max_m() && gemm_gemv_available()) return 4;
  return M <= kSplitkAutoMaxM ? 1 : 2;
}

bool valid(int M, int N, int K, int group) {
  return M >= 0 && N > 0 && K > 0 && N % 32 == 0 && K % 32 == 0 &&
         (group == 0 || ((group == 64 || group == 128) && K % group == 0));
}

// The automatic choice at M <= 8 where the cluster GEMV does not run, from the split-K block-shape sweep on an H100
// (DESIGN.md): when the row tiles alone about fill the GPU, take at most two waves of it, and one CTA can stage all
// of K, split-K block shape 4 (16 warps, 8 tiles in flight each) without splitting K (4096x4096: 6.7 us vs 8.2 for
// the default shape's 5 splits; 14336x4096: 15.2 vs 16.4). Grouped, that shape holds 1 CTA per SM (82 registers),
// so 14336 rows are 3.4 waves and slower (23.6 vs 16.9 us): the wave bound sends that case to the default shape.
int tuned(int kernel, int M, int N, int K, int group) {
  if (kernel != 0 || M > 8 || gemm_gemv_available()) return kernel;
  const int tiles_n = N / 32, resident = splitk_variant_occupancy(kSplitkWideShape, 1, group > 0) * num_sms();
  if (4 * tiles_n >= 3 * num_sms() && tiles_n <= 2 * resident && K / 32 <= splitk_slice_tiles(M))
    return 1 | (kSplitkWideShape << 4) | (1 << 8);
  return kernel;
}

}  // namespace

size_t gemm_mma_kernel_workspace(int kernel, int M, int N, int K, int group) {
  const int code = kernel & 0xF;
  if (!valid(M, N, K, group) || M == 0 || kernel < 0 || code == 3 || code > 4) return 0;
  kernel = tuned(kernel, M, N, K, group);
  const int kind = pick(kernel, M), variant = (kernel >> 4) & 0xF, force_s = kernel >> 8;
  if (kind == 1 && M > splitk_max_m()) return 0;
  if (kind == 4) return 0;   // reduces over distributed shared memory
  return kind == 1 ? splitk_workspace(M, N, K, group, variant, force_s) : tile_workspace(M, N, K, group);
}

size_t gemm_mma_workspace(int M, int N, int K, int group) { return gemm_mma_kernel_workspace(0, M, N, K, group); }

cudaError_t gemm_mma_kernel(int kernel, const void* xq, const void* ascale, const void* asum, const void* qweight,
                            const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                            void* out, int M, int N, int K, int group, void* workspace, size_t ws_bytes,
                            cudaStream_t stream) {
  const int code = kernel & 0xF;
  if (!valid(M, N, K, group) || kernel < 0 || code == 3 || code > 4) return cudaErrorInvalidValue;
  kernel = tuned(kernel, M, N, K, group);
  const int kind = pick(kernel, M), variant = (kernel >> 4) & 0xF, force_s = kernel >> 8;
  if (kind == 1 && M > splitk_max_m()) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  GemmArgs p{};
  const cudaError_t e = make_gemm_args(p, xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, out,
                                       M, N, K, group);
  if (e != cudaSuccess) return e;
  if (kind == 4) return launch_gemv(p, stream, variant, force_s);
  return kind == 1 ? launch_splitk(p, workspace, ws_bytes, stream, variant, force_s)
                   : launch_tile(p, workspace, ws_bytes, stream);
}

cudaError_t make_gemm_args(GemmArgs& p, const void* xq, const void* ascale, const void* asum, const void* qweight,
                           const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                           void* out, int M, int N, int K, int group) {
  if (!valid(M, N, K, group)) return cudaErrorInvalidValue;
  if (!xq || !ascale || !qweight || !s1_scales || !out || !aligned16(xq) || !aligned16(qweight))
    return cudaErrorInvalidValue;
  if (group == 0 && (!s1_szeros || !asum)) return cudaErrorInvalidValue;
  if (group > 0 && (!s2_scales || !s2_zeros || !aligned16(s2_scales) || !aligned16(s2_zeros)))
    return cudaErrorInvalidValue;
  p = GemmArgs{};
  p.xq = static_cast<const int8_t*>(xq);
  p.ascale = static_cast<const __half*>(ascale);
  p.asum = static_cast<const __half*>(asum);
  p.qweight = static_cast<const uint8_t*>(qweight);
  p.s1 = static_cast<const __half*>(s1_scales);
  p.szeros = static_cast<const __half*>(s1_szeros);
  p.s2s = static_cast<const uint8_t*>(s2_scales);
  p.s2z = static_cast<const uint8_t*>(s2_zeros);
  p.out = static_cast<__half*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group = group;
  p.S = 1;
  return cudaSuccess;
}

cudaError_t gemm_mma(const void* xq, const void* ascale, const void* asum, const void* qweight, const void* s1_scales,
                     const void* s1_szeros, const void* s2_scales, const void* s2_zeros, void* out, int M, int N,
                     int K, int group, void* workspace, size_t ws_bytes, cudaStream_t stream) {
  return gemm_mma_kernel(0, xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, out, M, N, K, group,
                         workspace, ws_bytes, stream);
}

}  // namespace dcc_w4a8
