// Host API of the W4A4 kernels for Nunchaku (SVDQuant) INT4 artifacts (research/targets.md 3A): the activation
// kernel (smooth division, per-64-group 4-bit codes, 16-bit scales, the low-rank down-projection of the raw input)
// and the GEMM (exact int32 per 64-k group, fp32 group accumulation, bias and low-rank up-projection in the epilogue,
// one rounding to the 16-bit output). The numerics are in csrc/w4a4/DESIGN.md and mirrored bit for bit on the CPU by
// dcc/targets/nunchaku/cuda_numerics.py.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace dcc_w4a4 {

constexpr int kGroup = 64;   // INT4 group size: one 16-bit activation / weight scale per 64 k

// All pointers are device pointers, all matrices row-major and contiguous; functions only enqueue on `stream` and
// return cudaSuccess or an error (cudaErrorInvalidValue for a bad shape or pointer; no exceptions).
// dtype: 0 = float16, 1 = bfloat16 (x, smooth, lora_down_t, ascales, wscales, bias, lora_up, out).
//
// quant_act: x [M, K] 16-bit; smooth [K] 16-bit or null (no division); lora_down_t [K, R] 16-bit (the low-rank
// down factor transposed; null iff R == 0); out: codes int8 [M, K] (one 4-bit code per byte: s4 in [-8, 7], or u4
// in [0, 15] when is_unsigned), ascales [M, K/64] 16-bit, lora_act fp32 [M, R] (null iff R == 0). shift: added to x
// (a 16-bit add) before the division (Nunchaku's SHIFT_GELU 0.171875 for an unsigned layer, else 0).
// workspace: fp32 [M, K/64, R] scratch (quant_act_workspace bytes; null when that is 0). K % 64 == 0, R % 16 == 0.
// ascales_t: fp32 [K/64, ld] or null: also the scales for gemm_wgmma, group-major, each the exact fp32 value of the
// 16-bit scale written to ascales, token m at column tok_pos(m) (within each 16-token block, m = 16a + 8b + 2t + e
// goes to 16a + 4t + 2b + e: wgmma_kernel.cuh); ld >= M, a multiple of 16; the other columns untouched.
// fp8_codes: the codes as the e4m3 bytes of their (exact) values, for gemm_wgmma's fp8 variant.
cudaError_t quant_act(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                      void* lora_act, void* workspace, size_t ws_bytes, int M, int K, int R, int dtype,
                      int is_unsigned, float shift, cudaStream_t stream, void* ascales_t = nullptr, int ld = 0,
                      int fp8_codes = 0);
size_t quant_act_workspace(int M, int K, int R);

// lora_down: the low-rank down-projection alone (quant_act's lora_act, the same bits), token-blocked (lora_down.cu):
// x [M, K] and lora_down_t [K, R] 16-bit, 16-byte aligned; lora_act fp32 [M, R]. K % 64 == 0, R % 16 == 0, R > 0.
// quant_act uses it where DCC_W4A4_LORA_DOWN=blocked.
cudaError_t lora_down(const void* x, const void* lora_down_t, void* lora_act, int M, int K, int R, int dtype,
                      cudaStream_t stream);

// gemm: acodes int8 [M, K] and ascales [M, K/64] (quant_act's), wcodes int8 [N, K] (signed 4-bit weight codes, one
// per byte), wscales [N, K/64] 16-bit, bias [N] 16-bit or null, lora_act fp32 [M, R] and lora_up [N, R] 16-bit
// (null iff R == 0); out [M, N] 16-bit. K % 64 == 0; M, N any positive size.
cudaError_t gemm(const void* acodes, const void* ascales, const void* wcodes, const void* wscales, const void* bias,
                 const void* lora_act, const void* lora_up, void* out, int M, int N, int K, int R, int dtype,
                 cudaStream_t stream);

// gemm_wgmma (Hopper, sm_90a; gemm_wgmma.cu): the same GEMM and the same bits as gemm, with the scales as fp32
// group-major: ascales_t [K/64, ld] (quant_act's, ld >= M, ld % 16 == 0) and wscales_t [K/64, N] (the exact fp32
// values of the 16-bit wscales, transposed once per layer). N % 64 == 0, K % 128 == 0; 16-byte aligned codes,
// scales and output. cudaErrorNotSupported where the GPU or the build has no sm_90a kernel. fp8 = 1: acodes and
// wcodes hold the codes as e4m3 bytes (quant_act's fp8_codes; the same bits out, gemm_wgmma.cu).
cudaError_t gemm_wgmma(const void* acodes, const void* ascales_t, int ld, const void* wcodes, const void* wscales_t,
                       const void* bias, const void* lora_act, const void* lora_up, void* out, int M, int N, int K,
                       int R, int dtype, int fp8, cudaStream_t stream, int lora_tc = 0,
                       const void* lora_up_f32 = nullptr);
// lora_tc = 1 asks for the third kernel with the low-rank branch on the tensor cores (fp8 = 1, N % 128 == 0,
// R % 32 == 0; lora_up_f32: fp32 [N, R], the exact values of lora_up): not bit-identical to gemm; before the 16-bit
// rounding within ~1e-6 of the magnitude of an output's terms of the exact result (wgmma3_kernel.cuh).
// gemm_wgmma runs this shape on this GPU (an sm_90 device, the sm_90a kernels built, the shape rules above).
bool gemm_wgmma_supported(int M, int N, int K);
// The token tile gemm_wgmma picks (64 or 128; DCC_W4A4_WGMMA="tile=..." forces it).
int gemm_wgmma_tile(int M, int N);
// Which of gemm_wgmma's kernels takes this shape: 1, or 2 (128 x 128 tiles, wgmma2_kernel.cuh; where N % 128 == 0,
// R % 32 == 0 and the tiles fill every SM), or 3 / 4 (wgmma3_kernel.cuh / wgmma4_kernel.cuh, fp8 only) where
// DCC_W4A4_WGMMA="kernel=3" / "kernel=4" asks.
int gemm_wgmma_kernel(int M, int N, int R);

// An attribute of the current device (gemm_wgmma.cu), 0 where it cannot be read.
int device_attr(cudaDeviceAttr a);

// NVFP4 (research/targets.md 3A; dcc/ir/w4a4.py quantize_act_nvfp4): the same input path without shift, e2m1 codes
// per 16-k micro-group. codes uint8 [M, K] (e2m1 bit patterns sign << 3 | magnitude index, one per byte), ascales
// uint8 [M, K/16] (e4m3 bytes); the rest as quant_act (K % 64 == 0: the kernel walks 64-k chunks).
cudaError_t quant_act_nvfp4(const void* x, const void* smooth, const void* lora_down_t, void* codes, void* ascales,
                            void* lora_act, void* workspace, size_t ws_bytes, int M, int K, int R, int dtype,
                            cudaStream_t stream);

// gemm_nvfp4: acodes uint8 [M, K] e2m1 patterns and ascales uint8 [M, K/16] e4m3 bytes (quant_act_nvfp4's), wcodes
// uint8 [N, K] e2m1 patterns, wscales uint8 [N, K/16] e4m3 bytes, alpha the per-tensor weight scale (fp32),
// wcscales [N] 16-bit per-channel scales or null; bias, lora_act, lora_up, out as gemm. K % 64 == 0.
cudaError_t gemm_nvfp4(const void* acodes, const void* ascales, const void* wcodes, const void* wscales, float alpha,
                       const void* wcscales, const void* bias, const void* lora_act, const void* lora_up, void* out,
                       int M, int N, int K, int R, int dtype, cudaStream_t stream);

}  // namespace dcc_w4a4
