// Dequantise the TinyChat layout to a plain [N, K] 16-bit weight (bit-identical to decode_weight), a bias
// epilogue, and the large-M path: dequantise into a scratch buffer, then one cuBLAS GEMM.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "util.h"
#include "w4a16.h"

namespace dcc_w4a16 {

namespace {

// Four threads per 16-byte qweight chunk (row n, 32 consecutive k): thread q of the four writes the 16 output bytes
// k0 + 8q .. k0 + 8q + 7 (pairs 4q .. 4q+3, i.e. nibble q of the chunk's four 32-bit words). A warp thus stores 512
// bytes as four fully used 128-byte runs (row n, k0 .. k0 + 63) and reads 128 contiguous qweight bytes (each
// chunk 4 times, from L1). ITEMS quarter-chunks per thread, all loads issued first.
template <typename T, int ITEMS>
__global__ void __launch_bounds__(256)
    dequant_kernel(const uint4* __restrict__ qw, const T* __restrict__ scales, const T* __restrict__ szeros,
                   T* __restrict__ w, int N, int K, int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  const unsigned K8 = (unsigned)K >> 3;
  const unsigned total = (unsigned)(N >> 2) * K8 * 4;  // < 2^32: checked by the launcher
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned base = blockIdx.x * blockDim.x + threadIdx.x; base < total; base += stride * ITEMS) {
    uint4 v[ITEMS];
    T s[ITEMS], z[ITEMS];
    size_t dst[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const unsigned e = base + i * stride;
      if (e < total) {
        const unsigned chunk = e >> 2;
        const unsigned n4 = chunk / K8, c = chunk - n4 * K8;
        const unsigned n = 4 * n4 + ((c >> 1) & 3);
        const unsigned k0 = 64 * (c >> 3) + 32 * (c & 1);
        v[i] = __ldg(qw + chunk);
        const size_t si = (size_t)(k0 >> gshift) * N + n;
        s[i] = scales[si];
        z[i] = szeros[si];
        dst[i] = (size_t)n * K + k0 + 8 * (e & 3);
      }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const unsigned e = base + i * stride;
      if (e < total) {
        const int q = (int)(e & 3);
        const T2 s2 = H::broadcast(s[i]), z2 = H::broadcast(z[i]);
        uint4 o;
        o.x = as_bits(dequant_pair_ij<T>(v[i], q, 0, s2, z2));
        o.y = as_bits(dequant_pair_ij<T>(v[i], q, 1, s2, z2));
        o.z = as_bits(dequant_pair_ij<T>(v[i], q, 2, s2, z2));
        o.w = as_bits(dequant_pair_ij<T>(v[i], q, 3, s2, z2));
        *reinterpret_cast<uint4*>(w + dst[i]) = o;
      }
    }
  }
}

// out[m, n] += bias[n], two elements per thread (N is even), fp32 add then one rounding.
template <typename T>
__global__ void __launch_bounds__(256) add_bias_kernel(T* __restrict__ out, const T* __restrict__ bias, int M, int N) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  const int N2 = N >> 1;
  const size_t total = (size_t)M * N2;
  T2* o2 = reinterpret_cast<T2*>(out);
  const T2* b2 = reinterpret_cast<const T2*>(bias);
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
    const T2 o = o2[idx], b = b2[idx % N2];
    T2 r;
    r.x = H::from_float(H::to_float(o.x) + H::to_float(b.x));
    r.y = H::from_float(H::to_float(o.y) + H::to_float(b.y));
    o2[idx] = r;
  }
}

int grid_for(size_t work, int threads) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const size_t want = (work + threads - 1) / threads;
  const size_t cap = (size_t)sms * 8;  // 8 blocks of 256 per SM: full occupancy, then grid-stride
  return (int)(want < cap ? (want ? want : 1) : cap);
}

}  // namespace

void dequantize(DType dt, const void* qweight, const void* scales, const void* scaled_zeros, void* w, int N, int K,
                int group_size, cudaStream_t stream) {
  check_problem(0, N, K, group_size);
  check_aligned(qweight, "qweight");
  check_aligned(w, "w");
  const int gshift = log2_group(group_size);
  constexpr int kItems = 4;
  const size_t quarters = (size_t)(N / 4) * (K / 8) * 4;
  if (quarters + (size_t)256 * 132 * 8 * kItems >= (size_t)1 << 32)
    throw std::invalid_argument("dcc w4a16: dequantize supports N*K < 2^34");
  const int grid = grid_for((quarters + kItems - 1) / kItems, 256);
  if (dt == DType::kFloat16)
    dequant_kernel<__half, kItems><<<grid, 256, 0, stream>>>(static_cast<const uint4*>(qweight),
                                                     static_cast<const __half*>(scales),
                                                     static_cast<const __half*>(scaled_zeros),
                                                     static_cast<__half*>(w), N, K, gshift);
  else
    dequant_kernel<__nv_bfloat16, kItems><<<grid, 256, 0, stream>>>(static_cast<const uint4*>(qweight),
                                                            static_cast<const __nv_bfloat16*>(scales),
                                                            static_cast<const __nv_bfloat16*>(scaled_zeros),
                                                            static_cast<__nv_bfloat16*>(w), N, K, gshift);
  check_cuda(cudaGetLastError(), "dequantize kernel launch");
}

void add_bias(DType dt, void* out, const void* bias, int M, int N, cudaStream_t stream) {
  if (M <= 0 || bias == nullptr) return;
  if (N % 2) throw std::invalid_argument("dcc w4a16: add_bias needs an even N");
  if (reinterpret_cast<std::uintptr_t>(out) % 4 || reinterpret_cast<std::uintptr_t>(bias) % 4)
    throw std::invalid_argument("dcc w4a16: add_bias needs 4-byte aligned out and bias");
  const int grid = grid_for((size_t)M * (N / 2), 256);
  if (dt == DType::kFloat16)
    add_bias_kernel<__half><<<grid, 256, 0, stream>>>(static_cast<__half*>(out), static_cast<const __half*>(bias), M, N);
  else
    add_bias_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(out),
                                                             static_cast<const __nv_bfloat16*>(bias), M, N);
  check_cuda(cudaGetLastError(), "bias kernel launch");
}

void gemm_dequant_cublas(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
                         const void* bias, void* out, void* w_scratch, int M, int N, int K, int group_size,
                         cudaStream_t stream) {
  check_problem(M, N, K, group_size);
  if (M == 0) return;
  dequantize(dt, qweight, scales, scaled_zeros, w_scratch, N, K, group_size, stream);
  cublas_gemm_nt(dt, x, w_scratch, out, M, N, K, stream);
  if (bias != nullptr) add_bias(dt, out, bias, M, N, stream);
}

}  // namespace dcc_w4a16
