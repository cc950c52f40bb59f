// GEMV v5 configurations (gemv_pipe.cuh, benchmark only): the benchmark reaches them through gemv_variant
// (gemv_variants.cu), after the variants of that file.
#include <stdexcept>
#include <string>

#include "gemv_pipe.cuh"

namespace dcc_w4a16 {

namespace {

struct PipeConfig {
  const char* name;
  int max_m;
};

// name: w<warps per block>_s<ring slots per warp>[_m<max M>][_np: one block per row tile, not persistent]
constexpr PipeConfig kPipeConfigs[] = {
    {"p_w32_s3", 1}, {"p_w32_s4", 1}, {"p_w16_s3", 1}, {"p_w16_s4", 1}, {"p_w16_s6", 1},
    {"p_w8_s4", 1},  {"p_w16_s3_np", 1}, {"p_w32_s3_m4", 4}, {"p_w16_s4_m4", 4},
};
constexpr int kNumPipe = sizeof(kPipeConfigs) / sizeof(kPipeConfigs[0]);
static_assert(kNumPipe == kNumPipeConfigs, "pipe config table");

template <typename T>
bool dispatch_pipe(int config, const void* x, const void* qweight, const void* scales, const void* szeros,
                   const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
#define DCC_P(W, S, MC, PERSIST) \
  return launch_pipe<T, W, S, MC>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, PERSIST, 0, stream)
  switch (config) {
    case 0: DCC_P(32, 3, 1, true);
    case 1: DCC_P(32, 4, 1, true);
    case 2: DCC_P(16, 3, 1, true);
    case 3: DCC_P(16, 4, 1, true);
    case 4: DCC_P(16, 6, 1, true);
    case 5: DCC_P(8, 4, 1, true);
    case 6: DCC_P(16, 3, 1, false);
    case 7: DCC_P(32, 3, 4, true);
    case 8: DCC_P(16, 4, 4, true);
    default: throw std::invalid_argument("dcc w4a16: unknown pipelined GEMV config " + std::to_string(config));
  }
#undef DCC_P
}

}  // namespace

const char* gemv_pipe_name(int config) { return config >= 0 && config < kNumPipe ? kPipeConfigs[config].name : ""; }

int gemv_pipe_max_m(int config) { return config >= 0 && config < kNumPipe ? kPipeConfigs[config].max_m : 0; }

bool gemv_pipe(int config, DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
               const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (M > gemv_pipe_max_m(config))
    throw std::invalid_argument("dcc w4a16: pipelined GEMV config " + std::to_string(config) + " takes M <= " +
                                std::to_string(gemv_pipe_max_m(config)));
  if (M == 0) return true;
  if (dt == DType::kFloat16)
    return dispatch_pipe<__half>(config, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
  return dispatch_pipe<__nv_bfloat16>(config, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
}

}  // namespace dcc_w4a16
