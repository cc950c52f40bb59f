// Benchmark-only GEMV alternatives (csrc/w4a16/DESIGN.md: v1 settings, v3 lane-spread activations, v4 activations
// in shared memory, v2f/v6/v7 block shapes, v8 tail split, v5 cp.async rings via gemv_pipe), reachable through
// gemv_variant by name; the product's dispatch (csrc/w4a16/gemv.cu) uses l_w16_u1 / l_w4_u1 / lp_w16 /
// w16_u1_xpre_fdq for M <= 8, which are here too so that the benchmark times them side by side.
#include <stdexcept>
#include <string>

#include "gemv_persist.cuh"
#include "gemv_tail_split.cuh"
#include "variants.h"

namespace dcc_w4a16 {

namespace {


// Experiment (GEMV v3 in csrc/w4a16/DESIGN.md; reachable through gemv_variant only, not the default: it measured no faster
// than the v2 default). M <= MP (MP in {1, 2, 4, 8}), one B tile: the same product as fused_w4a16_kernel<T, 1, ...>,
// but the activations of an iteration (MP rows x 128 k) are spread over the warp's 32 lanes, 2*MP words per lane,
// and each lane fetches its B fragment with 16 shuffles when the slot is consumed. That keeps 2*MP registers per
// ring slot instead of 16, so two iterations fit in flight at 16 warps per block.
// Lane L = m*(32/MP) + tt*(8/MP) + q holds words 16*tt + 2*MP*q + r (r < 2*MP) of row m of the 128-k run, i.e.
// x[m, 128*it + 32*tt + 4*MP*q + 2r, +1]: lane (g, t) finds word p of its run (g, t) in register p % (2*MP) of lane
// g*(32/MP) + t*(8/MP) + p / (2*MP).
// Register cap: 32 resident warps per SM (64 registers at 16 warps per block), so that N/16 blocks of a
// 4096-row layer (256 blocks on 132 SMs) are all resident at once.
template <typename T, int MP, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32, 1024 / (WARPS * 32))
    gemv_shfl_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                     const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                     int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  constexpr int XW = 2 * MP;  // words per lane per iteration
  __shared__ float4 red[WARPS][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * kRowsPerBlock;
  const int nA = n_base + g, nB = n_base + 8 + g;
  const bool okA = nA < N, okB = nB < N;
  const int K8 = K >> 3;
  const uint4* qA = qw + (size_t)(nA >> 2) * K8 + 2 * (nA & 3) + (t & 1) + 8 * (t >> 1);
  const uint4* qB = qw + (size_t)(nB >> 2) * K8 + 2 * (nB & 3) + (t & 1) + 8 * (t >> 1);
  const int KI = (K + kKPerIter - 1) / kKPerIter;
  // this lane's share of the activations
  const int xm = lane / (32 / MP), xrem = lane % (32 / MP);
  const int xt = xrem / (8 / MP), xq = xrem % (8 / MP);
  const T* xbase = x + (size_t)xm * K + 32 * xt + 4 * MP * xq;
  const bool xrow_ok = xm < M;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  const T zero = H::from_float(0.f);

  uint4 wa[U], wb[U];
  T sa[U], za[U], sb[U], zb[U];
  uint32_t xw[U][XW];
  auto issue = [&](int u, int it) {
    const int k0 = it * kKPerIter + 32 * t;
    const bool ok = k0 < K;
    const size_t grp = (size_t)(k0 >> gshift) * N;
    wa[u] = (ok && okA) ? ld_stream_u4(qA + 16 * (size_t)it) : zero4;
    wb[u] = (ok && okB) ? ld_stream_u4(qB + 16 * (size_t)it) : zero4;
    sa[u] = (ok && okA) ? scales[grp + nA] : zero;
    za[u] = (ok && okA) ? szeros[grp + nA] : zero;
    sb[u] = (ok && okB) ? scales[grp + nB] : zero;
    zb[u] = (ok && okB) ? szeros[grp + nB] : zero;
    const bool xok = xrow_ok && it * kKPerIter + 32 * xt < K;
    const T* xp = xbase + (size_t)it * kKPerIter;
    if constexpr (MP == 1) {
      const uint2 v = xok ? __ldg(reinterpret_cast<const uint2*>(xp)) : make_uint2(0, 0);
      xw[u][0] = v.x;
      xw[u][1] = v.y;
    } else {
#pragma unroll
      for (int c = 0; c < XW / 4; ++c) {
        const uint4 v = xok ? ld_cached_u4(xp + 8 * c) : zero4;
        xw[u][4 * c + 0] = v.x;
        xw[u][4 * c + 1] = v.y;
        xw[u][4 * c + 2] = v.z;
        xw[u][4 * c + 3] = v.w;
      }
    }
  };
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;
#pragma unroll
  for (int u = 0; u < U; ++u) issue(u, warp + u * WARPS);

  const bool brow_ok = g < M;
  const int src_base = g * (32 / MP) + t * (8 / MP);
  for (int j0 = 0; j0 < n_it; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n_it) {  // warp-uniform: every lane takes part in the shuffles
        const T2 sa2 = H::broadcast(sa[u]), za2 = H::broadcast(za[u]);
        const T2 sb2 = H::broadcast(sb[u]), zb2 = H::broadcast(zb[u]);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const int p0 = 2 * s, p1 = 2 * s + 1;
          uint32_t b0 = __shfl_sync(0xffffffffu, xw[u][p0 % XW], (src_base + p0 / XW) & 31);
          uint32_t b1 = __shfl_sync(0xffffffffu, xw[u][p1 % XW], (src_base + p1 / XW) & 31);
          b0 = brow_ok ? b0 : 0u;
          b1 = brow_ok ? b1 : 0u;
          const uint32_t a0 = as_bits(dequant_pair<T>(wa[u], p0, sa2, za2));
          const uint32_t a1 = as_bits(dequant_pair<T>(wb[u], p0, sb2, zb2));
          const uint32_t a2 = as_bits(dequant_pair<T>(wa[u], p1, sa2, za2));
          const uint32_t a3 = as_bits(dequant_pair<T>(wb[u], p1, sb2, zb2));
          mma_16816<T>(acc, a0, a1, a2, a3, b0, b1);
        }
      }
      if (j0 + U + u < n_it) issue(u, warp + (j0 + U + u) * WARPS);
    }
  }

  red[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  reduce_store<T, 1, WARPS>(reinterpret_cast<const float*>(&red[0][0]), bias, out, M, N, n_base);
}


// GEMV v4 (csrc/w4a16/DESIGN.md): M <= 4 (one B tile), the same product, k order and reduction as
// fused_w4a16_kernel<T, 1, ...>, but the activations are staged once per block in shared memory (M rows of K, rows
// padded by 8 elements) and each lane reads its 64-byte B run from there when a slot is consumed. The ring then holds
// only weights and scales (12 registers per slot instead of 28), so U = 2..4 iterations per warp fit in flight:
// at N = 4096, K = 4096 (2 iterations per warp at 16 warps) every weight byte of the launch is requested up front.
template <typename T, int WARPS, int U, int MINB, int XR>
__global__ void __launch_bounds__(WARPS * 32, MINB)
    gemv_xs_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                   const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                   int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  extern __shared__ uint4 xs_raw[];
  T* xs = reinterpret_cast<T*>(xs_raw);
  __shared__ float4 red[WARPS][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * kRowsPerBlock;
  const int nA = n_base + g, nB = n_base + 8 + g;
  const bool okA = nA < N, okB = nB < N;
  const int K8 = K >> 3;
  const int KP = K + 8;
  const uint4* qA = qw + (size_t)(nA >> 2) * K8 + 2 * (nA & 3) + (t & 1) + 8 * (t >> 1);
  const uint4* qB = qw + (size_t)(nB >> 2) * K8 + 2 * (nB & 3) + (t & 1) + 8 * (t >> 1);
  const int KI = (K + kKPerIter - 1) / kKPerIter;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  const T zero = H::from_float(0.f);

  uint4 wa[U], wb[U];
  T sa[U], za[U], sb[U], zb[U];
  auto issue = [&](int u, int it) {
    const int k0 = it * kKPerIter + 32 * t;
    const bool ok = k0 < K;
    const size_t grp = (size_t)(k0 >> gshift) * N;
    wa[u] = (ok && okA) ? ld_stream_u4(qA + 16 * (size_t)it) : zero4;
    wb[u] = (ok && okB) ? ld_stream_u4(qB + 16 * (size_t)it) : zero4;
    sa[u] = (ok && okA) ? scales[grp + nA] : zero;
    za[u] = (ok && okA) ? szeros[grp + nA] : zero;
    sb[u] = (ok && okB) ? scales[grp + nB] : zero;
    zb[u] = (ok && okB) ? szeros[grp + nB] : zero;
  };
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;
  // XR > 0: the first XR chunks per thread of x are requested before the weights (so that they do not queue behind
  // the weight traffic), held in registers and stored to shared memory after the weight loads are issued.
  constexpr int NT = WARPS * 32;
  uint4 xpre[XR > 0 ? XR : 1];
#pragma unroll
  for (int r = 0; r < XR; ++r) {
    const int c = threadIdx.x + r * NT;
    const int m = c / K8, kc = c - m * K8;
    xpre[r] = c < M * K8 ? ld_cached_u4(x + (size_t)m * K + 8 * kc) : zero4;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) issue(u, warp + u * WARPS);
#pragma unroll
  for (int r = 0; r < XR; ++r) {
    const int c = threadIdx.x + r * NT;
    const int m = c / K8, kc = c - m * K8;
    if (c < M * K8) reinterpret_cast<uint4*>(xs + (size_t)m * KP)[kc] = xpre[r];
  }

  // Stage (the rest of) x, after the weight loads are issued, so the two latencies overlap.
  for (int c = threadIdx.x + XR * NT; c < M * K8; c += NT) {
    const int m = c / K8, kc = c - m * K8;
    reinterpret_cast<uint4*>(xs + (size_t)m * KP)[kc] = ld_cached_u4(x + (size_t)m * K + 8 * kc);
  }
  __syncthreads();

  const bool brow = g < M;
  const T* xrow = xs + (size_t)(brow ? g : 0) * KP + 32 * t;
  for (int j0 = 0; j0 < n_it; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n_it) {
        const int it = warp + (j0 + u) * WARPS;
        const bool xok = brow && it * kKPerIter + 32 * t < K;
        uint4 xv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
          xv[q] = xok ? reinterpret_cast<const uint4*>(xrow + (size_t)it * kKPerIter)[q] : zero4;
        const T2 sa2 = H::broadcast(sa[u]), za2 = H::broadcast(za[u]);
        const T2 sb2 = H::broadcast(sb[u]), zb2 = H::broadcast(zb[u]);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const uint32_t a0 = as_bits(dequant_pair<T>(wa[u], 2 * s, sa2, za2));
          const uint32_t a1 = as_bits(dequant_pair<T>(wb[u], 2 * s, sb2, zb2));
          const uint32_t a2 = as_bits(dequant_pair<T>(wa[u], 2 * s + 1, sa2, za2));
          const uint32_t a3 = as_bits(dequant_pair<T>(wb[u], 2 * s + 1, sb2, zb2));
          const uint32_t b0 = word_of(xv[(2 * s) >> 2], (2 * s) & 3);
          const uint32_t b1 = word_of(xv[(2 * s + 1) >> 2], (2 * s + 1) & 3);
          mma_16816<T>(acc, a0, a1, a2, a3, b0, b1);
        }
      }
      if (j0 + U + u < n_it) issue(u, warp + (j0 + U + u) * WARPS);
    }
  }

  red[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  reduce_store<T, 1, WARPS>(reinterpret_cast<const float*>(&red[0][0]), bias, out, M, N, n_base);
}

constexpr int kXsMaxM = 4;

inline size_t xs_smem_bytes(int M, int K) { return (size_t)M * (size_t)(K + 8) * 2; }

// Whether gemv_xs_kernel's staged activations fit the device's opt-in shared memory per block (with the reduction
// buffer of up to 16 warps) -- the default dispatch falls back to fused_w4a16_kernel otherwise.
inline bool xs_fits(int M, int K) {
  if (M > kXsMaxM) return false;
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return false;
  return xs_smem_bytes(M, K) + 16 * 32 * 16 <= (size_t)optin;
}

template <typename T, int WARPS, int U, int MINB, int XR>
void launch_xs(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
               void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (M > kXsMaxM) throw std::invalid_argument("dcc w4a16: shared-x GEMV kernel takes M <= 4");
  const size_t smem = xs_smem_bytes(M, K);
  if (smem > 48 * 1024) {
    if (!xs_fits(M, K)) throw std::invalid_argument("dcc w4a16: shared-x GEMV kernel: M*K too large");
    check_cuda(cudaFuncSetAttribute(gemv_xs_kernel<T, WARPS, U, MINB, XR>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem),
               "shared-x GEMV kernel smem attribute");
  }
  const dim3 grid((N + kRowsPerBlock - 1) / kRowsPerBlock);
  gemv_xs_kernel<T, WARPS, U, MINB, XR><<<grid, WARPS * 32, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
      static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift);
  check_cuda(cudaGetLastError(), "shared-x GEMV kernel launch");
}

template <typename T, int MP, int WARPS, int U>
void launch_shfl(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                 void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (M > MP) throw std::invalid_argument("dcc w4a16: shuffle GEMV kernel takes M <= " + std::to_string(MP));
  const dim3 grid((N + kRowsPerBlock - 1) / kRowsPerBlock);
  gemv_shfl_kernel<T, MP, WARPS, U><<<grid, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
      static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift);
  check_cuda(cudaGetLastError(), "shuffle GEMV kernel launch");
}

// Benchmark-only alternatives (csrc/w4a16/DESIGN.md): warps per block (w), iterations in flight per warp (u), activations
// loaded when consumed / in the ring (xpre) / spread over the lanes (sP: M <= P); mt2 = two B tiles (M <= 16).
constexpr const char* kVariantNames[] = {"w8_u2",     "w16_u1_xpre", "s1_w16_u2", "s1_w8_u2",
                                         "s1_w16_u1", "s2_w16_u2",   "s4_w16_u2", "s4_w16_u1",
                                         "s8_w16_u1", "mt2_w8_u2",   "mt2_w8_u2_xpre", "mt2_w16_u1_xpre",
                                         "xs_w16_u2", "xs_w16_u4", "xs_w8_u4",  "xs_w8_u2",
                                         "xs_w16_u3", "xs_w16_u2_xf", "xs_w8_u2_xf", "w16_u1_xpre_fdq",
                                         "l_w16_u1",  "l_w16_u2",  "l_w8_u2",   "l_w16_u1_r2",
                                         "l_w8_u2_r2", "l_w32_u1_r2", "lp_w16",    "lp_w32",
                                         "lp8_w16",   "l_w8_u1",   "l_w4_u1",   "lp_w8",
                                         "l_w4_u1_r2", "lp_w4",     "l_w4_u2"};
constexpr int kVariantMaxM[] = {8, 8, 1, 1, 1, 2, 4, 4, 8, 16, 16, 16, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8,
                                8, 8, 8, 8, 8, 8};
constexpr int kNumOwnVariants = sizeof(kVariantMaxM) / sizeof(kVariantMaxM[0]);  // then the gemv_pipe configs

template <typename T>
void dispatch_variant(int variant, const void* x, const void* qweight, const void* scales, const void* szeros,
                      const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
#define DCC_V(MT, W, U, XP) \
  return launch_fused<T, MT, W, U, XP>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream)
#define DCC_X(W, U, B, XR) return launch_xs<T, W, U, B, XR>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream)
#define DCC_L(W, U, RT) return launch_lean<T, W, U, RT>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream)
#define DCC_S(MP, W, U) return launch_shfl<T, MP, W, U>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream)
  switch (variant) {
    case 0: DCC_V(1, 8, 2, false);
    case 1: DCC_V(1, 16, 1, true);
    case 2: DCC_S(1, 16, 2);
    case 3: DCC_S(1, 8, 2);
    case 4: DCC_S(1, 16, 1);
    case 5: DCC_S(2, 16, 2);
    case 6: DCC_S(4, 16, 2);
    case 7: DCC_S(4, 16, 1);
    case 8: DCC_S(8, 16, 1);
    case 9: DCC_V(2, 8, 2, false);
    case 10: DCC_V(2, 8, 2, true);
    case 11: DCC_V(2, 16, 1, true);
    case 12: DCC_X(16, 2, 2, 0);
    case 13: DCC_X(16, 4, 1, 0);
    case 14: DCC_X(8, 4, 3, 0);
    case 15: DCC_X(8, 2, 4, 0);
    case 16: DCC_X(16, 3, 1, 0);
    case 17: DCC_X(16, 2, 2, 2);
    case 18: DCC_X(8, 2, 4, 2);
    case 19: return launch_fused<T, 1, 16, 1, true, true>(x, qweight, scales, szeros, bias, out, M, N, K, gshift,
                                                          stream);
    case 20: DCC_L(16, 1, 1);
    case 21: DCC_L(16, 2, 1);
    case 22: DCC_L(8, 2, 1);
    case 23: DCC_L(16, 1, 2);
    case 24: DCC_L(8, 2, 2);
    case 25: DCC_L(32, 1, 2);
    // v7 (the default for N/16 > resident blocks), and v8: v7 + the last round's tiles split in K
    case 26: return launch_lean_persist<T, 16>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    case 27: return launch_lean_persist<T, 32>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    case 28: return launch_tail_split<T, 16>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    // fewer warps per tile: more iterations per warp (K = 4096: 4 / 8 instead of 2), more blocks resident
    case 29: DCC_L(8, 1, 1);
    case 30: DCC_L(4, 1, 1);
    case 31: return launch_lean_persist<T, 8>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    // the fast decoder's fused gate_up (N = 28672 at Llama-3-8B): 1792 4-warp blocks are 1.7 waves of the 8 an SM
    // holds at 64 registers; two row tiles a warp make it 896 blocks, one wave
    case 32: DCC_L(4, 1, 2);
    // the same question answered by a persistent 4-warp grid (one round of resident blocks), or by two iterations
    // in flight a warp (more bytes in flight when the tail wave leaves an SM fewer blocks)
    case 33: return launch_lean_persist<T, 4>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    case 34: DCC_L(4, 2, 1);
    default: throw std::invalid_argument("dcc w4a16: unknown gemv variant " + std::to_string(variant));
  }
#undef DCC_X
#undef DCC_L
#undef DCC_S
#undef DCC_V
}

}  // namespace

static_assert(sizeof(kVariantNames) / sizeof(kVariantNames[0]) == kNumOwnVariants, "variant table");
static_assert(kNumOwnVariants + kNumPipeConfigs == kNumGemvVariants, "variant table");

const char* gemv_variant_name(int variant) {
  if (variant >= kNumOwnVariants) return gemv_pipe_name(variant - kNumOwnVariants);
  return variant >= 0 ? kVariantNames[variant] : "";
}

int gemv_variant_max_m(int variant) {
  if (variant >= kNumOwnVariants) return gemv_pipe_max_m(variant - kNumOwnVariants);
  return variant >= 0 ? kVariantMaxM[variant] : 0;
}

void gemv_variant(int variant, DType dt, const void* x, const void* qweight, const void* scales,
                  const void* scaled_zeros, const void* bias, void* out, int M, int N, int K, int group_size,
                  cudaStream_t stream) {
  const int gshift = check_gemv_call(M, N, K, group_size, x, qweight);
  if (variant < 0 || variant >= kNumGemvVariants)
    throw std::invalid_argument("dcc w4a16: unknown gemv variant " + std::to_string(variant));
  if (M > gemv_variant_max_m(variant))
    throw std::invalid_argument("dcc w4a16: gemv variant " + std::to_string(variant) + " takes M <= " +
                                std::to_string(gemv_variant_max_m(variant)));
  if (M == 0) return;
  if (variant >= kNumOwnVariants) {
    if (!gemv_pipe(variant - kNumOwnVariants, dt, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift,
                   stream))
      throw std::invalid_argument(std::string("dcc w4a16: gemv variant ") + gemv_variant_name(variant) +
                                  " does not fit this problem (shared memory for K = " + std::to_string(K) + ")");
    return;
  }
  if (dt == DType::kFloat16)
    dispatch_variant<__half>(variant, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
  else
    dispatch_variant<__nv_bfloat16>(variant, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
}

}  // namespace dcc_w4a16
