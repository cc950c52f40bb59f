// Host API of the W4A16 kernels (TinyChat "v2" layout). All pointers are device pointers; every function only
// enqueues work on `stream` and throws std::runtime_error on a bad argument or a CUDA/cuBLAS error.
//
// Shapes: x [M, K] row-major, qweight int16 [N/4, K], scales / scaled_zeros [Kg, N] (Kg = K/G padded as the
// layout says; only rows < K/G are read), bias [N] or null, out [M, N] row-major, all 16-bit tensors of one
// dtype. Requirements (checked): N % 4 == 0, K % 64 == 0, K % G == 0, G in {32, 64, 128}; x, qweight and the
// dequantised-weight buffer 16-byte aligned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace dcc_w4a16 {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Fused dequantise + tensor-core product, weights read once per 8*mtiles rows of x. mtiles in {1, 2, 4, 8}
// (0 = pick the smallest that covers M, up to 8); M larger than 8*mtiles is processed in chunks.
void gemv(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
          const void* bias, void* out, int M, int N, int K, int group_size, int mtiles, cudaStream_t stream);

// A gate_up projection and SwiGLU in one GEMV: the weight's rows interleave gate and up in blocks of 8 (gate rows
// 8j..8j+7, then the matching up rows), and out [M, N / 2] = SiLU(gate) * up of the rounded 16-bit products, in
// float32 as dcc's silu_mul (bit for bit). Only where the lean GEMVs run: gemv_glu_fits (M <= 8, K % 128 == 0,
// N % 16 == 0); no bias.
bool gemv_glu_fits(int M, int N, int K);
void gemv_glu(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros, void* out,
              int M, int N, int K, int group_size, cudaStream_t stream);

// delta [M, N] = x W^T as gemv computes it (the same bits), then, in the same launch, the decoder's residual add and
// RMSNorm of each row: h [M, N] float32 += delta, x_out = RMSNorm(h) * weight (16-bit), the bits of csrc/attn's
// add_rmsnorm. counter: one unsigned, zero before the first launch (each launch leaves it zero). Only where
// gemv_add_rmsnorm_fits (gemv_norm.cu: M <= 8, K % 128 == 0, N % 16 == 0, N <= 8192, one wave of blocks).
bool gemv_add_rmsnorm_fits(DType dt, int M, int N, int K);
void gemv_add_rmsnorm(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
                      void* delta, int M, int N, int K, int group_size, float* h, const void* weight, void* x_out,
                      float eps, unsigned* counter, cudaStream_t stream);

// w [N, K] row-major = rnd(q*s + sz), bit-identical to decode_weight.
void dequantize(DType dt, const void* qweight, const void* scales, const void* scaled_zeros, void* w, int N, int K,
                int group_size, cudaStream_t stream);

// out[m, n] += bias[n] (16-bit, rounded once from fp32).
void add_bias(DType dt, void* out, const void* bias, int M, int N, cudaStream_t stream);

// Dequantise into `w_scratch` ([N, K], 16-bit) then out = x @ w^T through cuBLAS (fp32 accumulation), then bias.
void gemm_dequant_cublas(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
                         const void* bias, void* out, void* w_scratch, int M, int N, int K, int group_size,
                         cudaStream_t stream);

// out[M, N] = x[M, K] @ w[N, K]^T through cuBLAS (no quantisation; used by gemm_dequant_cublas).
void cublas_gemm_nt(DType dt, const void* x, const void* w, void* out, int M, int N, int K, cudaStream_t stream);

// Hopper wgmma GEMM (gemm_wgmma.cu): dequantised weights in registers as the A operand, activations by TMA; split-K
// over a thread-block cluster where the tiles alone leave SMs idle. Needs an sm_90a build on an sm_90 GPU, N % 128
// == 0, K % 64 == 0 and 16-byte aligned x, qweight, scales, scaled_zeros and out (gemm_wgmma_supported checks the
// shape and the build; gemm_wgmma throws where a rule is broken). Returns the number of K splits it launched.
bool gemm_wgmma_supported(int M, int N, int K, int group_size);
int gemm_wgmma_tile(int M, int N = 0);
int gemm_wgmma(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
               const void* bias, void* out, int M, int N, int K, int group_size, cudaStream_t stream);

// cuBLAS is opened with dlopen at first use (no link-time dependency). `path` may name the library; empty tries
// the already-loaded libcublas.so.13/.12 and then the loader's search path. Returns "" on success, else why not.
std::string cublas_init(const std::string& path);
bool cublas_ready();

// Throws if a shape/group/alignment rule is broken.
void check_problem(int M, int N, int K, int group_size);
// check_problem plus 16-byte alignment of x and qweight; returns log2(group_size).
int check_gemv_call(int M, int N, int K, int group_size, const void* x, const void* qweight);

}  // namespace dcc_w4a16
