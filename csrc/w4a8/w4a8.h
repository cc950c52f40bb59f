// Host API of the W4A8 kernels for QServe-layout checkpoints (research/targets.md 1A). Shared by the mma.sync kernels
// (gemm_mma.cu, quant_act.cu) and the Hopper wgmma kernel (gemm_wgmma.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace dcc_w4a8 {

// All pointers are device pointers; functions only enqueue on `stream`, return cudaSuccess or an error (no exceptions).
// xq int8 [M,K] row-major; ascale, asum fp16 [M]; qweight int8 [N, K/2] QServe layout; s1_scales fp16 [N];
// s1_szeros fp16 [N] (group == 0) else null; s2_scales, s2_zeros int8 [K/group, N] (group 64 or 128) else null;
// out fp16 [M, N] row-major. workspace: device scratch of ws_bytes bytes (may be null when ws_bytes == 0).
cudaError_t quant_act(const void* x, void* xq, void* ascale, void* asum, int M, int K, cudaStream_t stream);
// QServe's fused ops as its kernels compute them (quant_fused.cu): x, gamma fp16 [M, H] / [H] -> xq int8 [M, H],
// ascale fp16 [M], asum fp16 [M] (null: rms_norm_general without the sum); norm_y and quant_normed split it at the
// float32 normed values y [M, H] (same bits); quant_engine is the engine's standalone quant kernel (x fp16 [M, K],
// its sum in float32 in the engine's order: unlike quant_act's exact sum); gate, up, out fp16 [M, D]. approx = 1:
// the engine's MUFU instructions (QServe's bits); 0: correctly rounded stand-ins (dcc's CPU emulation's bits).
cudaError_t norm_quant(const void* x, const void* gamma, float eps, void* xq, void* ascale, void* asum, int M, int H,
                       int approx, cudaStream_t stream);
cudaError_t norm_y(const void* x, const void* gamma, float eps, void* y, int M, int H, int approx,
                   cudaStream_t stream);
cudaError_t quant_normed(const void* y, void* xq, void* ascale, void* asum, int M, int H, int approx,
                         cudaStream_t stream);
cudaError_t quant_engine(const void* x, void* xq, void* ascale, void* asum, int M, int K, int approx,
                         cudaStream_t stream);
cudaError_t silu_mul(const void* gate, const void* up, void* out, int M, int D, int approx, cudaStream_t stream);
cudaError_t gemm_mma(const void* xq, const void* ascale, const void* asum, const void* qweight, const void* s1_scales,
                     const void* s1_szeros, const void* s2_scales, const void* s2_zeros, void* out,
                     int M, int N, int K, int group, void* workspace, size_t ws_bytes, cudaStream_t stream);
size_t gemm_mma_workspace(int M, int N, int K, int group);
// Hopper (sm_90a) wgmma kernel; cudaErrorNotSupported where not compiled for sm_90a or shape unsupported.
cudaError_t gemm_wgmma(const void* xq, const void* ascale, const void* asum, const void* qweight, const void* s1_scales,
                       const void* s1_szeros, const void* s2_scales, const void* s2_zeros, void* out,
                       int M, int N, int K, int group, void* workspace, size_t ws_bytes, cudaStream_t stream);
size_t gemm_wgmma_workspace(int M, int N, int K, int group);
bool gemm_wgmma_supported(int M, int N, int K, int group);   // compiled for sm_90a and shape OK
// Supported and expected faster than the mma.sync kernels (csrc/w4a8/DESIGN.md): where the cluster GEMV runs, not
// at M <= 16 on latency-bound layers nor at M < 8 on any; otherwise M >= 8, or M < 8 where the 16-token
// configuration's CTAs (tiles x K splits) fill at least 70% of the SMs.
bool gemm_wgmma_preferred(int M, int N, int K, int group);
// A layer small enough that a few-token GEMM is bound by load latency rather than DRAM bandwidth: at most 16 MB of
// 4-bit weights (4096x4096: 8 MB; 14336x4096: 29 MB is bandwidth-bound). Kernel choices at M <= 16 follow it.
inline bool latency_bound_layer(int N, int K) { return static_cast<long long>(N) * K / 2 <= (16LL << 20); }
// The cluster GEMV kernel (gemm_mma's choice for M <= 16; gemm_gemv.cu) is built and this GPU runs it (sm_90+).
bool gemm_gemv_available();

// Beyond the shared contract (tests and benchmarks): gemm_mma with its kernel forced. kernel & 0xF: 0 = the automatic
// choice (gemm_mma), 1 = split-K kernel (M <= 32 only), 2 = tiled multistage kernel, 4 = cluster GEMV (M <= 16,
// sm_90+); 3 (the stream-K kernel) is not built here (dev/cuda/w4a8). (kernel >> 4) & 0xF: block-shape variant
// (split-K 0 or 4, 4 for M <= 16 only; the other split-K shapes live in dev/cuda/w4a8; GEMV 0 = chosen per layer,
// 1..10); kernel >> 8: forced number of K splits of the split-K or GEMV kernel (0 auto). gemm_mma's workspace must
// be all zero before its first use (its first 64 KB hold the split-K arrival counters, which every call leaves zero
// again).
cudaError_t gemm_mma_kernel(int kernel, const void* xq, const void* ascale, const void* asum, const void* qweight,
                            const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                            void* out, int M, int N, int K, int group, void* workspace, size_t ws_bytes,
                            cudaStream_t stream);
size_t gemm_mma_kernel_workspace(int kernel, int M, int N, int K, int group);

// Shared by the launchers (host side, gemm_mma.cu): the GPU's SM count (cached; 132 where it cannot be read) and its
// compute capability major (cached; 0 where it cannot be read). The sm_90 kernels and the activation quantization
// always launch with programmatic dependent launch there.
int num_sms();
int device_major();

}  // namespace dcc_w4a8
