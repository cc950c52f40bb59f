// The fused W4A16 kernel templates for small M and their launchers, used by gemv.cu (the dispatch) and, with other
// template arguments, by the benchmark-only variants in dev/cuda/w4a16.
//
// Fused W4A16 kernel for small M: dequantise the 4-bit weights in registers and multiply on the tensor cores
// (mma.sync m16n8k16, fp32 accumulation), reading each weight byte once per launch.
//
// Mapping. The product is computed transposed, out^T[N, M] = W[N, K] * x^T[K, M]: W is the 16-row A operand and
// up to 8 rows of x form the 8-column B operand (8*MT rows with MT B tiles). A block owns 16 output rows
// (n_base .. n_base+15); its WARPS warps split K. In one iteration a warp covers 16 rows x 128 k: lane (g, t)
// (g = lane/4, t = lane%4) loads the 16-byte chunk of rows n_base+g and n_base+8+g for k0 = 128*it + 32*t, i.e.
// qweight[n4, 64*kt + 16*r + 8*h .. +8] with kt = k0/64, h = t%2 -- the 16 lanes of one n4 (4 rows x 4 t) cover
// 256 contiguous bytes, so each load instruction reads two fully used 256-byte segments.
// Default launch for M <= 8: 16 warps per block, activations loaded with the weights ("w16_u1_xpre"); M <= 16:
// two B tiles; up to 64: 4 or 8 B tiles (M above 8*MT runs in chunks). Measurements: DESIGN.md.
// The k order inside an mma is free as long as A and B agree: in mma s (0..7) lane (g, t) supplies, as logical
// k columns {2t, 2t+1} and {2t+8, 2t+9}, the physical pairs 2s and 2s+1 of its own chunk (k0 + 4s .. k0 + 4s + 3),
// for rows g and g+8 (A) and for x row m = g (B). All 16 rows of a tile use the same k0 for a given t, so the
// mapping is consistent, and every k of the 128 is used exactly once.
#pragma once

#include <stdexcept>
#include <string>

#include "../common/pdl.cuh"
#include "common.cuh"
#include "util.h"
#include "w4a16.h"

namespace dcc_w4a16 {

namespace {

constexpr int kRowsPerBlock = 16;
constexpr int kKPerIter = 128;
// Iterations of weights past the first ring a lean GEMV prefetches into L2 before its PDL wait: 2 x 1 KB a warp,
// at most a quarter of the layer at K = 4096 (the largest, gate_up of Llama-3-8B, 59 MB: 15 MB of the 50 MB L2).
constexpr int kPrefetchIters = 2;


// The block's epilogue: sum the WARPS partial C fragments (split K) staged in shared memory as
// red[WARPS][MT][32 lanes][4] and write out[M, N] (+ bias), one fp32 rounding to T per element.
// GLU (gate_up GEMMs whose rows interleave gate and up in blocks of 8, gate first; no bias): each tile's rows
// n_base + j and n_base + 8 + j are gate and up of output column n_base / 2 + j of out[M, N / 2], which is
// SiLU(gate) * up of the two rounded 16-bit products, in float32 as csrc/attn's silu_mul computes it (the same bits).
template <typename T, int MT, int WARPS, bool GLU = false>
__device__ __forceinline__ void reduce_store(const float* redf, const T* __restrict__ bias, T* __restrict__ out,
                                             int M, int N, int n_base) {
  using H = Half2Of<T>;
  const int cols = M < 8 * MT ? M : 8 * MT;  // only the columns m < M are stored: sum only those
  if constexpr (GLU) {
    for (int e = threadIdx.x; e < 8 * cols; e += WARPS * 32) {
      const int nl = e & 7, m = e >> 3;
      const int mt = m >> 3, mm = m & 7;
      // C fragment rows nl (c0/c1: gate) and nl + 8 (c2/c3: up) of column m live in the same lane
      const int src_lane = 4 * nl + (mm >> 1), c = mm & 1;
      float sg = 0.f, su = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        sg += redf[((w * MT + mt) * 32 + src_lane) * 4 + c];
        su += redf[((w * MT + mt) * 32 + src_lane) * 4 + 2 + c];
      }
      if (m < M) {
        const float gf = H::to_float(H::from_float(sg)), uf = H::to_float(H::from_float(su));
        const float act = __fdiv_rn(gf, __fadd_rn(1.f, expf(-gf)));   // torch's silu in float32
        out[(size_t)m * (N / 2) + n_base / 2 + nl] = H::from_float(__fmul_rn(act, uf));
      }
    }
  } else {
    for (int e = threadIdx.x; e < kRowsPerBlock * cols; e += WARPS * 32) {
      const int nl = e & 15, m = e >> 4;
      const int mt = m >> 3, mm = m & 7;
      // C fragment: c0/c1 = (row g, cols 2t, 2t+1), c2/c3 = (row g+8, same cols); rows are n, cols are m.
      const int src_lane = 4 * (nl & 7) + (mm >> 1);
      const int c = ((nl >> 3) << 1) | (mm & 1);
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += redf[((w * MT + mt) * 32 + src_lane) * 4 + c];
      const int n = n_base + nl;
      if (m < M && n < N) {
        if (bias != nullptr) sum += H::to_float(bias[n]);
        out[(size_t)m * N + n] = H::from_float(sum);
      }
    }
  }
}

template <typename T, int MT, int WARPS, int U, bool XPRE, bool FASTDQ = false>
__global__ void __launch_bounds__(WARPS * 32)
    fused_w4a16_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                       const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                       int K, int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  __shared__ float4 red[WARPS][MT][32];
  // PDL (../common/pdl.cuh): let the next kernel launch; wait for the previous one before any load (this kernel's
  // loads take weights and activations together)
  dcc_pdl::launch_dependents();
  dcc_pdl::wait();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * kRowsPerBlock;
  const int nA = n_base + g, nB = n_base + 8 + g;
  const bool okA = nA < N, okB = nB < N;  // N % 4 == 0: a whole n4 is in or out
  const int K8 = K >> 3;                  // 16-byte chunks per qweight row
  // chunk of iteration `it` for row n: n4*K8 + 8*(k0/64) + 2*r + h, k0/64 = 2*it + t/2
  const uint4* qA = qw + (size_t)(nA >> 2) * K8 + 2 * (nA & 3) + (t & 1) + 8 * (t >> 1);
  const uint4* qB = qw + (size_t)(nB >> 2) * K8 + 2 * (nB & 3) + (t & 1) + 8 * (t >> 1);
  const int KI = (K + kKPerIter - 1) / kKPerIter;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

  const uint4 zero4 = make_uint4(0, 0, 0, 0);

  // A ring of U iterations of loads per warp: the prologue issues U iterations, and each slot is refilled with the
  // iteration U ahead right after it is consumed. Loads issued before the loop (or refilled for the next trip)
  // cannot be sunk by the compiler next to their use, so U iterations stay in flight. With XPRE the activations
  // ride in the ring too (else they are loaded, from L1/L2, when the slot is consumed).
  uint4 wa[U], wb[U];
  T sa[U], za[U], sb[U], zb[U];
  uint4 xr[XPRE ? U : 1][MT][4];
  const T zero = H::from_float(0.f);
  auto load_x = [&](uint4 (&dst)[MT][4], int it) {
    const int k0 = it * kKPerIter + 32 * t;
    const bool ok = k0 < K;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = g + 8 * mt;
      const T* xp = x + (size_t)m * K + k0;
#pragma unroll
      for (int q = 0; q < 4; ++q) dst[mt][q] = (ok && m < M) ? ld_act_u4(xp + 8 * q) : zero4;
    }
  };
  auto issue = [&](int u, int it) {
    const int k0 = it * kKPerIter + 32 * t;  // it >= KI gives k0 >= K: nothing loaded
    const bool ok = k0 < K;
    const size_t grp = (size_t)(k0 >> gshift) * N;
    wa[u] = (ok && okA) ? ld_stream_u4(qA + 16 * (size_t)it) : zero4;
    wb[u] = (ok && okB) ? ld_stream_u4(qB + 16 * (size_t)it) : zero4;
    sa[u] = (ok && okA) ? scales[grp + nA] : zero;
    za[u] = (ok && okA) ? szeros[grp + nA] : zero;
    sb[u] = (ok && okB) ? scales[grp + nB] : zero;
    zb[u] = (ok && okB) ? szeros[grp + nB] : zero;
    if constexpr (XPRE) load_x(xr[u], it);
  };
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;  // this warp's iterations: warp + j*WARPS
#pragma unroll
  for (int u = 0; u < U; ++u) issue(u, warp + u * WARPS);

  for (int j0 = 0; j0 < n_it; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n_it) {
        if constexpr (!XPRE) load_x(xr[0], warp + (j0 + u) * WARPS);
        const uint4 (&xv)[MT][4] = xr[XPRE ? u : 0];
        const T2 sa2 = H::broadcast(sa[u]), za2 = H::broadcast(za[u]);
        const T2 sb2 = H::broadcast(sb[u]), zb2 = H::broadcast(zb[u]);
        uint32_t da[16], db[16];  // FASTDQ: the chunks dequantised by dequant_chunk (same values, fewer instructions)
        if constexpr (FASTDQ) {
          dequant_chunk<T>(wa[u], sa2, za2, da);
          dequant_chunk<T>(wb[u], sb2, zb2, db);
        }
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const uint32_t a0 = FASTDQ ? da[2 * s] : as_bits(dequant_pair<T>(wa[u], 2 * s, sa2, za2));
          const uint32_t a1 = FASTDQ ? db[2 * s] : as_bits(dequant_pair<T>(wb[u], 2 * s, sb2, zb2));
          const uint32_t a2 = FASTDQ ? da[2 * s + 1] : as_bits(dequant_pair<T>(wa[u], 2 * s + 1, sa2, za2));
          const uint32_t a3 = FASTDQ ? db[2 * s + 1] : as_bits(dequant_pair<T>(wb[u], 2 * s + 1, sb2, zb2));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            // x pair p = 32-bit word p of the 64-byte run: uint4 p/4, component p%4.
            const uint32_t b0 = word_of(xv[mt][(2 * s) >> 2], (2 * s) & 3);
            const uint32_t b1 = word_of(xv[mt][(2 * s + 1) >> 2], (2 * s + 1) & 3);
            mma_16816<T>(acc[mt], a0, a1, a2, a3, b0, b1);
          }
        }
      }
      if (j0 + U + u < n_it) issue(u, warp + (j0 + U + u) * WARPS);
    }
  }

  // Reduce the WARPS partial sums of the block (split K) and write [M, N] with the row index fastest.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) red[warp][mt][lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
  __syncthreads();
  reduce_store<T, MT, WARPS>(reinterpret_cast<const float*>(&red[0][0][0]), bias, out, M, N, n_base);
}

template <typename T, int MT, int WARPS, int U, bool XPRE, bool FASTDQ = false>
void launch_fused(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                  void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  const dim3 grid((N + kRowsPerBlock - 1) / kRowsPerBlock);
  const int rows = 8 * MT;
  for (int m0 = 0; m0 < M; m0 += rows) {
    const int mc = M - m0 < rows ? M - m0 : rows;
    check_cuda(dcc_pdl::launch(fused_w4a16_kernel<T, MT, WARPS, U, XPRE, FASTDQ>, grid, dim3(WARPS * 32), 0, stream,
                               static_cast<const T*>(x) + (size_t)m0 * K, static_cast<const uint4*>(qweight),
                               static_cast<const T*>(scales), static_cast<const T*>(szeros),
                               static_cast<const T*>(bias), static_cast<T*>(out) + (size_t)m0 * N, mc, N, K, gshift),
               "fused w4a16 kernel launch");
  }
}

// GEMV v6 (DESIGN.md): the v2 mapping for M <= 8 with fewer instructions per weight, for "full" shapes only
// (K % 128 == 0, N % (16*RT) == 0: no bounds checks). Each lane walks four pointers (qweight, scales, scaled zeros,
// x) by a fixed stride per iteration instead of recomputing addresses; loads are unpredicated (B columns >= M read
// row M-1 of x: valid memory, and those columns of the product are never stored), so no registers are zeroed; the
// dequantisation is dequant_chunk. RT row tiles per warp (16*RT rows per block) share each iteration's activations.
// Same products, k order and reduction order as fused_w4a16_kernel<T, 1, WARPS, ...>.
// The kernel's body as a device function: the GEMV that ends in a residual add + RMSNorm (gemv_norm.cu) runs it too.
template <typename T, int WARPS, int U, int RT, bool GLU>
__device__ __forceinline__ void gemv_lean_tile(const T* __restrict__ x, const uint4* __restrict__ qw,
                                               const T* __restrict__ scales, const T* __restrict__ szeros,
                                               const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                                               int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  __shared__ float4 red[RT][WARPS][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * (16 * RT);
  const int nA = n_base + g;
  const int K8 = K >> 3;
  const int KI = K >> 7;
  const size_t tile_q = (size_t)4 * K8;  // 16 rows of qweight, in 16-byte chunks
  const uint4* pq = qw + (size_t)(nA >> 2) * K8 + 2 * (nA & 3) + (t & 1) + 8 * (t >> 1) + 16 * warp;
  const size_t s_it = (size_t)(128 >> gshift) * N;  // scales rows per iteration
  const size_t s_off = (size_t)((32 * t) >> gshift) * N + (size_t)warp * s_it + nA;
  const T* ps = scales + s_off;
  const T* pz = szeros + s_off;
  const T* px = x + (size_t)(g < M ? g : M - 1) * K + 32 * t + 128 * warp;
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;

  float acc[RT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;

  uint4 wa[U][RT], wb[U][RT], xr[U][4];
  T sa[U][RT], sb[U][RT], za[U][RT], zb[U][RT];
  auto issue_w = [&](int u) {   // an iteration's weights, scales and zeros (constant: loadable before the PDL wait)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      wa[u][r] = ld_stream_u4(pq + r * tile_q);
      wb[u][r] = ld_stream_u4(pq + r * tile_q + 2 * K8);
      sa[u][r] = ps[16 * r];
      sb[u][r] = ps[16 * r + 8];
      za[u][r] = pz[16 * r];
      zb[u][r] = pz[16 * r + 8];
    }
    pq += 16 * WARPS;
    ps += s_it * WARPS;
    pz += s_it * WARPS;
  };
  auto issue_x = [&](int u) {   // its activations (the previous kernel's output)
#pragma unroll
    for (int q = 0; q < 4; ++q) xr[u][q] = ld_act_u4(px + 8 * q);
    px += 128 * WARPS;
  };
  auto issue = [&](int u) {
    issue_w(u);
    issue_x(u);
  };
  // PDL (../common/pdl.cuh): the first U iterations' weights are loaded, and the next kPrefetchIters' prefetched
  // into L2, while the previous kernel finishes; the activations after the wait
  dcc_pdl::launch_dependents();
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < n_it) issue_w(u);
  for (int j = U; j < n_it && j < U + kPrefetchIters; ++j)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      dcc_pdl::prefetch_l2(pq + (j - U) * 16 * WARPS + r * tile_q);
      dcc_pdl::prefetch_l2(pq + (j - U) * 16 * WARPS + r * tile_q + 2 * K8);
    }
  dcc_pdl::wait();
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < n_it) issue_x(u);

  for (int j0 = 0; j0 < n_it; j0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u < n_it) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          uint32_t da[16], db[16];
          dequant_chunk<T>(wa[u][r], H::broadcast(sa[u][r]), H::broadcast(za[u][r]), da);
          dequant_chunk<T>(wb[u][r], H::broadcast(sb[u][r]), H::broadcast(zb[u][r]), db);
#pragma unroll
          for (int s = 0; s < 8; ++s)
            mma_16816<T>(acc[r], da[2 * s], db[2 * s], da[2 * s + 1], db[2 * s + 1],
                         word_of(xr[u][s >> 1], (2 * s) & 3), word_of(xr[u][s >> 1], (2 * s + 1) & 3));
        }
        if (j0 + U + u < n_it) issue(u);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RT; ++r) red[r][warp][lane] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < RT; ++r)
    reduce_store<T, 1, WARPS, GLU>(reinterpret_cast<const float*>(&red[r][0][0]), bias, out, M, N, n_base + 16 * r);
}

template <typename T, int WARPS, int U, int RT, bool GLU = false>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_lean_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                     const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                     int gshift) {
  gemv_lean_tile<T, WARPS, U, RT, GLU>(x, qw, scales, szeros, bias, out, M, N, K, gshift);
}

// Whether gemv_lean_kernel takes this problem (M <= 8 rows of x per launch, no partial tiles).
inline bool lean_fits(int M, int N, int K, int RT) { return M >= 1 && M <= 8 && K % 128 == 0 && N % (16 * RT) == 0; }

template <typename T, int WARPS, int U, int RT, bool GLU = false>
void launch_lean(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                 void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (!lean_fits(M, N, K, RT))
    throw std::invalid_argument(
        "dcc w4a16: lean GEMV kernel does not fit this problem (needs M <= 8, K % 128 == 0, N % " +
        std::to_string(16 * RT) + " == 0)");
  check_cuda(dcc_pdl::launch(gemv_lean_kernel<T, WARPS, U, RT, GLU>, dim3(N / (16 * RT)), dim3(WARPS * 32), 0, stream,
                             static_cast<const T*>(x), static_cast<const uint4*>(qweight),
                             static_cast<const T*>(scales), static_cast<const T*>(szeros),
                             static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift),
             "lean GEMV kernel launch");
}

}  // namespace

}  // namespace dcc_w4a16
