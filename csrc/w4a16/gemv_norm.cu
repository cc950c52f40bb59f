// A W4A16 GEMV that ends in the decoder's residual add + RMSNorm (the fast decoder's o and down projections at
// M <= 8): delta = x W^T as gemv's 16-warp lean kernel computes it (gemv_lean_tile: the same bits), then the last
// block to finish -- an arrival counter, reset by that block, so nothing is zeroed between launches or graph
// replays -- runs h += delta and x_out = RMSNorm(h) * weight on each row, with ../common/rmsnorm_row.cuh, as
// csrc/attn's add_rmsnorm kernel does (the same bits). One launch instead of two: the norm's launch, its wait for the
// GEMV's grid and its own round trips leave the decode step's critical path, and a last-block epilogue of about
// three round trips (counter, then h and delta from L2) takes their place.
// Where it runs (gemv_add_rmsnorm_fits): the lean kernel's shapes (M <= 8, K % 128 == 0, N % 16 == 0), a row that
// fits the registers (N <= 8192), and N / 16 blocks that are all resident at once (the 16-warp kernel's default
// range, gemv.cu: N = 4096 on an H100; a second wave would be slower than the plain kernel plus the norm).
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common/rmsnorm_row.cuh"
#include "gemv_persist.cuh"

namespace dcc_w4a16 {

namespace {

constexpr int kNormWarps = 16;

struct NormEpilogue {
  float* h;              // [M, N] float32 residual, updated in place
  const void* weight;    // [N] 16-bit
  void* x_out;           // [M, N] 16-bit: RMSNorm(h + delta) * weight
  unsigned* counter;     // zero between launches
  float eps;
};

template <typename T, int V>
__global__ void __launch_bounds__(kNormWarps * 32)
    gemv_add_rmsnorm_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                            const T* __restrict__ szeros, T* __restrict__ delta, int M, int N, int K, int gshift,
                            NormEpilogue ne) {
  gemv_lean_tile<T, kNormWarps, 1, 1, false>(x, qw, scales, szeros, nullptr, delta, M, N, K, gshift);
  // this block's delta rows are in L2 before the counter says so (the classic last-block pattern)
  __threadfence();
  __syncthreads();
  __shared__ unsigned last;
  __shared__ float warp_part[dcc_rmsnorm::kRowThreads / 32];
  if (threadIdx.x == 0) last = atomicAdd(ne.counter, 1u) == gridDim.x - 1 ? 1u : 0u;
  __syncthreads();
  if (last == 0u) return;
  __threadfence();
  constexpr int dt = std::is_same<T, __half>::value ? 0 : 1;
  const int n4 = N / 4;
  float4 gw[V];
  dcc_rmsnorm::load_weight<V, true>(ne.weight, n4, dt, gw);
  for (int m = 0; m < M; ++m) {
    const size_t row = static_cast<size_t>(m) * N;
    float4 v[V];
    dcc_rmsnorm::load_add<V, true>(ne.h + row, delta + row, n4, dt, v);
    const float r = dcc_rmsnorm::row_rsqrt<V, true>(v, N, ne.eps, warp_part);
    dcc_rmsnorm::store_norm<V, true>(static_cast<T*>(ne.x_out) + row, v, gw, r, n4, dt);
    __syncthreads();   // warp_part is the next row's
  }
  if (threadIdx.x == 0) *ne.counter = 0u;
}

// Resident blocks of the kernel for a row of V float4s a thread (its registers set the occupancy).
template <typename T, int V>
int slots() {
  static int cached[64] = {};
  return resident_slots(gemv_add_rmsnorm_kernel<T, V>, kNormWarps * 32, cached);
}

template <typename T>
bool fits(int M, int N, int K) {
  if (!lean_fits(M, N, K, 1)) return false;
  const int tiles = N / 16;
  switch (dcc_rmsnorm::row_vectors(N)) {
    case 1: return tiles <= slots<T, 1>();
    case 2: return tiles <= slots<T, 2>();
    case 4: return tiles <= slots<T, 4>();
    case 8: return tiles <= slots<T, 8>();
    default: return false;
  }
}

template <typename T>
void launch(const void* x, const void* qweight, const void* scales, const void* szeros, void* delta, int M, int N,
            int K, int gshift, NormEpilogue ne, cudaStream_t stream) {
  const dim3 grid(N / 16), block(kNormWarps * 32);
#define DCC_NORM_V(V)                                                                                            \
  case V:                                                                                                       \
    check_cuda(dcc_pdl::launch(gemv_add_rmsnorm_kernel<T, V>, grid, block, 0, stream, static_cast<const T*>(x),    \
                               static_cast<const uint4*>(qweight), static_cast<const T*>(scales),                \
                               static_cast<const T*>(szeros), static_cast<T*>(delta), M, N, K, gshift, ne),       \
               "GEMV + add_rmsnorm launch");                                                                     \
    return;
  switch (dcc_rmsnorm::row_vectors(N)) {
    DCC_NORM_V(1)
    DCC_NORM_V(2)
    DCC_NORM_V(4)
    DCC_NORM_V(8)
    default: throw std::invalid_argument("dcc w4a16: GEMV + add_rmsnorm: N = " + std::to_string(N) + " too wide");
  }
#undef DCC_NORM_V
}

}  // namespace

bool gemv_add_rmsnorm_fits(DType dt, int M, int N, int K) {
  return dt == DType::kFloat16 ? fits<__half>(M, N, K) : fits<__nv_bfloat16>(M, N, K);
}

void gemv_add_rmsnorm(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
                      void* delta, int M, int N, int K, int group_size, float* h, const void* weight, void* x_out,
                      float eps, unsigned* counter, cudaStream_t stream) {
  const int gshift = check_gemv_call(M, N, K, group_size, x, qweight);
  if (M == 0) return;
  if (!gemv_add_rmsnorm_fits(dt, M, N, K))
    throw std::invalid_argument("dcc w4a16: GEMV + add_rmsnorm needs M <= 8, K % 128 == 0, N % 16 == 0, N <= 8192 "
                                "and N / 16 blocks resident at once, got M = " + std::to_string(M) + ", N = " +
                                std::to_string(N) + ", K = " + std::to_string(K));
  for (const auto& [p, name, align] : {std::tuple<const void*, const char*, uintptr_t>{h, "h", 16},
                                       {weight, "weight", 8}, {x_out, "x_out", 8}, {delta, "delta", 8},
                                       {counter, "counter", 4}})
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % align)
      throw std::invalid_argument(std::string("dcc w4a16: GEMV + add_rmsnorm: ") + name + " is null or not " +
                                  std::to_string(align) + "-byte aligned");
  const NormEpilogue ne{h, weight, x_out, counter, eps};
  if (dt == DType::kFloat16)
    launch<__half>(x, qweight, scales, scaled_zeros, delta, M, N, K, gshift, ne, stream);
  else
    launch<__nv_bfloat16>(x, qweight, scales, scaled_zeros, delta, M, N, K, gshift, ne, stream);
}

}  // namespace dcc_w4a16
