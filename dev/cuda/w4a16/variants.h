// Benchmark-only W4A16 GEMV variants (dev/cuda/w4a16, module dcc_w4a16_dev; not part of the installed runtime). They
// take the product's arguments (csrc/w4a16/w4a16.h) and are reached by index or name from bench/gpu_w4a16.py
// --variants and dev/cuda/w4a16/test_variants.py. What each measured: csrc/w4a16/DESIGN.md.
#pragma once

#include "w4a16.h"

namespace dcc_w4a16 {

// Alternative kernels and block shapes for M <= gemv_variant_max_m(variant) (gemv_variants.cu), then the cp.async
// ring configurations of gemv_pipe.cu. A variant that cannot take a shape throws std::invalid_argument saying
// "does not fit".
constexpr int kNumGemvVariants = 44;
const char* gemv_variant_name(int variant);
int gemv_variant_max_m(int variant);
void gemv_variant(int variant, DType dt, const void* x, const void* qweight, const void* scales,
                  const void* scaled_zeros, const void* bias, void* out, int M, int N, int K, int group_size,
                  cudaStream_t stream);

// GEMV v5 (gemv_pipe.cu): cp.async-ringed, persistent fused kernel for M <= gemv_pipe_max_m(config). gshift =
// log2(group size), arguments already checked (check_gemv_call). Returns false, launching nothing, when the config's
// shared memory does not fit this device for this K.
constexpr int kNumPipeConfigs = 9;
const char* gemv_pipe_name(int config);
int gemv_pipe_max_m(int config);
bool gemv_pipe(int config, DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
               const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream);

}  // namespace dcc_w4a16
