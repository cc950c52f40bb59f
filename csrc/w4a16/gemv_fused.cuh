// The fused W4A16 kernel template for small M and its launcher, shared by gemv.cu (the default dispatch) and
// gemv_variants.cu (the benchmark-only alternatives).
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
// two B tiles; up to 64: 4 or 8 B tiles (M above 8*MT runs in chunks). See csrc/NOTES.md for the measurements.
// The k order inside an mma is free as long as A and B agree: in mma s (0..7) lane (g, t) supplies, as logical
// k columns {2t, 2t+1} and {2t+8, 2t+9}, the physical pairs 2s and 2s+1 of its own chunk (k0 + 4s .. k0 + 4s + 3),
// for rows g and g+8 (A) and for x row m = g (B). All 16 rows of a tile use the same k0 for a given t, so the
// mapping is consistent, and every k of the 128 is used exactly once.
#pragma once

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "util.h"
#include "w4a16.h"

namespace dcc_w4a16 {

namespace {

constexpr int kRowsPerBlock = 16;
constexpr int kKPerIter = 128;


// The block's epilogue: sum the WARPS partial C fragments (split K) staged in shared memory as
// red[WARPS][MT][32 lanes][4] and write out[M, N] (+ bias), one fp32 rounding to T per element.
template <typename T, int MT, int WARPS>
__device__ __forceinline__ void reduce_store(const float* redf, const T* __restrict__ bias, T* __restrict__ out,
                                             int M, int N, int n_base) {
  using H = Half2Of<T>;
  const int cols = M < 8 * MT ? M : 8 * MT;  // only the columns m < M are stored: sum only those
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

template <typename T, int MT, int WARPS, int U, bool XPRE, bool FASTDQ = false>
__global__ void __launch_bounds__(WARPS * 32)
    fused_w4a16_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                       const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                       int K, int gshift) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  __shared__ float4 red[WARPS][MT][32];

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
      for (int q = 0; q < 4; ++q) dst[mt][q] = (ok && m < M) ? ld_cached_u4(xp + 8 * q) : zero4;
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
    fused_w4a16_kernel<T, MT, WARPS, U, XPRE, FASTDQ><<<grid, WARPS * 32, 0, stream>>>(
        static_cast<const T*>(x) + (size_t)m0 * K, static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
        static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out) + (size_t)m0 * N, mc, N, K,
        gshift);
    check_cuda(cudaGetLastError(), "fused w4a16 kernel launch");
  }
}

// GEMV v6 (csrc/NOTES.md): the v2 mapping for M <= 8 with fewer instructions per weight, for "full" shapes only
// (K % 128 == 0, N % (16*RT) == 0: no bounds checks). Each lane walks four pointers (qweight, scales, scaled zeros,
// x) by a fixed stride per iteration instead of recomputing addresses; loads are unpredicated (B columns >= M read
// row M-1 of x: valid memory, and those columns of the product are never stored), so no registers are zeroed; the
// dequantisation is dequant_chunk. RT row tiles per warp (16*RT rows per block) share each iteration's activations.
// Same products, k order and reduction order as fused_w4a16_kernel<T, 1, WARPS, ...>.
template <typename T, int WARPS, int U, int RT>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_lean_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                     const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
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
  auto issue = [&](int u) {
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      wa[u][r] = ld_stream_u4(pq + r * tile_q);
      wb[u][r] = ld_stream_u4(pq + r * tile_q + 2 * K8);
      sa[u][r] = ps[16 * r];
      sb[u][r] = ps[16 * r + 8];
      za[u][r] = pz[16 * r];
      zb[u][r] = pz[16 * r + 8];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) xr[u][q] = ld_cached_u4(px + 8 * q);
    pq += 16 * WARPS;
    ps += s_it * WARPS;
    pz += s_it * WARPS;
    px += 128 * WARPS;
  };
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < n_it) issue(u);

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
    reduce_store<T, 1, WARPS>(reinterpret_cast<const float*>(&red[r][0][0]), bias, out, M, N, n_base + 16 * r);
}

// GEMV v7 (csrc/NOTES.md): gemv_lean_kernel (RT = 1, U = 1) with a persistent grid, for layers of many row tiles
// (N = 14336 has 896 tiles: 3.4 rounds of the 264 resident blocks of the non-persistent kernel, each block 2
// iterations per warp). Block b takes the tiles b, b + gridDim.x, ...; each warp's ring slot is refilled across the
// tile boundary (the next tile's first loads are in flight while the block reduces the current tile), and the
// reduction buffer is double-buffered so that one __syncthreads per tile suffices (buffer i&1 was last read before
// the previous tile's barrier). Same products and reduction order as gemv_lean_kernel.
//
// v8 (split > 1): the full rounds as above, then the `tail` = tiles % gridDim.x tiles of the last, partial round are
// cut into `split` K ranges, one per block (split * tail <= gridDim.x), so that no block does a whole extra tile
// while most idle (896 tiles on 264 blocks: 4 tile-times on the critical path become 3.5). Each part stores its
// block-reduced fp32 sums in `part`; the last of a tile's parts to arrive (a counter in `flags`, reset by it for the
// next launch) adds the parts in part order 0..split-1, whichever block computed them, so the result does not
// depend on timing. Needs K / 128 % split == 0. Measured slower than v7 on 14336x4096 (16.2 vs 15.0 us, NOTES.md: the
// fence, counter and final sum of the parts cost more than the half tile saves), so it is a benchmark variant only.
template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, (2048 / 2) / (WARPS * 32))
    gemv_lean_persist_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                             const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M,
                             int N, int K, int gshift, int split, float* __restrict__ part,
                             unsigned* __restrict__ flags) {
  using H = Half2Of<T>;
  __shared__ float4 red[2][WARPS][32];
  __shared__ unsigned arrived;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = N >> 4, G = (int)gridDim.x, b = (int)blockIdx.x;
  const int full = tiles - (split > 1 ? tiles % G : 0);  // tiles taken whole
  const int my_tiles = (b < full) ? (full - b + G - 1) / G : 0;
  const bool has_part = split > 1 && b < split * (tiles - full);
  const int KI = K >> 7, KIp = KI / split;
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;     // iterations per whole tile
  const int n_itp = warp < KIp ? (KIp - warp + WARPS - 1) / WARPS : 0;  // per tail part (v8)
  const unsigned s_it = (unsigned)(128 >> gshift) * (unsigned)N;  // scale rows per 128-k chunk, in elements

  // 32-bit element offsets from the (constant) base pointers instead of four 64-bit pointers: five registers fewer,
  // which the 64-register budget of two 512-thread blocks per SM needs (no spills).
  unsigned oq, os, ox;
  // Work items of this block: tiles b, b + G, ... (items 0 .. my_tiles-1), then its tail part (item my_tiles).
  // seek: this warp's offsets at its first iteration (128-k chunk c0) of item `it`.
  auto seek = [&](int it) {
    const bool whole = it < my_tiles;
    const int tile = whole ? b + it * G : full + b / split;
    const unsigned c0 = whole ? warp : (b % split) * KIp + warp;
    const unsigned n = tile * 16 + g;
    oq = (n >> 2) * (unsigned)(K >> 3) + 2 * (n & 3) + (t & 1) + 8 * (t >> 1) + 16 * c0;
    os = (unsigned)((32 * t) >> gshift) * (unsigned)N + c0 * s_it + n;
    ox = (unsigned)(g < M ? g : M - 1) * (unsigned)K + 32 * t + 128 * c0;
  };

  uint4 wa, wb, xr[4];
  T sa, sb, za, zb;
  int left = my_tiles * n_it + (has_part ? n_itp : 0), j_iss = 0, item = 0;
  // issue: the loads of the next iteration; past an item's last one, seek the next item, so that the ring runs
  // across tile boundaries (and into the tail part) and the next loads are in flight during each block reduction.
  auto issue = [&]() {
    wa = ld_stream_u4(qw + oq);
    wb = ld_stream_u4(qw + oq + 2 * (K >> 3));
    sa = scales[os];
    sb = scales[os + 8];
    za = szeros[os];
    zb = szeros[os + 8];
#pragma unroll
    for (int q = 0; q < 4; ++q) xr[q] = ld_cached_u4(x + ox + 8 * q);
    oq += 16 * WARPS;
    os += s_it * WARPS;
    ox += 128 * WARPS;
    if (--left > 0 && ++j_iss == n_it) {  // only whole tiles end here: the part is the last item
      j_iss = 0;
      seek(++item);
    }
  };
  auto step = [&](float (&acc)[4]) {  // one iteration: 128 k of 16 rows, then the next issue if any is left
    uint32_t da[16], db[16];
    dequant_chunk<T>(wa, H::broadcast(sa), H::broadcast(za), da);
    dequant_chunk<T>(wb, H::broadcast(sb), H::broadcast(zb), db);
#pragma unroll
    for (int s = 0; s < 8; ++s)
      mma_16816<T>(acc, da[2 * s], db[2 * s], da[2 * s + 1], db[2 * s + 1], word_of(xr[s >> 1], (2 * s) & 3),
                   word_of(xr[s >> 1], (2 * s + 1) & 3));
    if (left > 0) issue();
  };
  if (n_it == 0 || my_tiles == 0) item = my_tiles;  // nothing to load for whole tiles: straight to the part
  seek(item);
  if (left > 0) issue();

  for (int i = 0; i < my_tiles; ++i) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < n_it; ++j) step(acc);
    red[i & 1][warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    reduce_store<T, 1, WARPS>(reinterpret_cast<const float*>(&red[i & 1][0][0]), bias, out, M, N,
                              (b + i * G) * 16);
  }
  if (!has_part) return;

  // v8: this block's part p = b % split of tail tile tt = b / split (K chunks [p * KIp, (p + 1) * KIp)).
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < n_itp; ++j) step(acc);
  const int buf = my_tiles & 1;  // the buffer not read since the last tile's barrier
  red[buf][warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  // This block's sums (same warp order as reduce_store), at most one element per thread for M <= 8.
  const float* redf = reinterpret_cast<const float*>(&red[buf][0][0]);
  const int tt = b / split, p = b % split;
  const int cols = M < 8 ? M : 8, e = threadIdx.x;
  const bool mine = e < 16 * cols;
  const int nl = e & 15, m = e >> 4;
  float* slot = part + (size_t)tt * split * 128;  // [split][8 m][16 n] floats per tail tile
  if (mine) {
    const int src_lane = 4 * (nl & 7) + (m >> 1), c = ((nl >> 3) << 1) | (m & 1);
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += redf[(w * 32 + src_lane) * 4 + c];
    slot[p * 128 + m * 16 + nl] = sum;
  }
  __threadfence();  // the part is visible device-wide before the counter says so
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicAdd(&flags[tt], 1u);
  __syncthreads();
  if (arrived != (unsigned)(split - 1)) return;  // not the last part of this tile
  __threadfence();
  if (mine) {
    float sum = 0.f;
    for (int q = 0; q < split; ++q) sum += __ldcg(slot + q * 128 + m * 16 + nl);  // fixed order: deterministic
    const int n = (full + tt) * 16 + nl;
    if (bias != nullptr) sum += H::to_float(bias[n]);
    out[(size_t)m * N + n] = H::from_float(sum);
  }
  if (threadIdx.x == 0) flags[tt] = 0u;  // ready for the next launch on this stream
}

// Whether gemv_lean_kernel takes this problem (M <= 8 rows of x per launch, no partial tiles).
inline bool lean_fits(int M, int N, int K, int RT) { return M >= 1 && M <= 8 && K % 128 == 0 && N % (16 * RT) == 0; }

template <typename T, int WARPS, int U, int RT>
void launch_lean(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                 void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (!lean_fits(M, N, K, RT))
    throw std::invalid_argument(
        "dcc w4a16: lean GEMV kernel does not fit this problem (needs M <= 8, K % 128 == 0, N % " +
        std::to_string(16 * RT) + " == 0)");
  gemv_lean_kernel<T, WARPS, U, RT><<<N / (16 * RT), WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
      static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift);
  check_cuda(cudaGetLastError(), "lean GEMV kernel launch");
}

// Resident blocks of gemv_lean_persist_kernel<T, WARPS> on the current device (SMs x blocks per SM), cached per
// device (a benign race: every writer stores the same value).
template <typename T, int WARPS>
int lean_persist_slots() {
  static int cached[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) throw std::runtime_error("dcc w4a16: device index out of range");
  if (cached[dev] == 0) {
    int sms = 0, bps = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "SM count");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, gemv_lean_persist_kernel<T, WARPS>, WARPS * 32, 0),
               "occupancy");
    cached[dev] = sms * (bps > 0 ? bps : 1);
  }
  return cached[dev];
}

// Scratch of the v8 tail split for the current device: part [slots][128] floats and flags [slots] counters, zeroed
// once (the kernel resets every counter it uses). Launches that share it must be ordered (one stream).
inline void split_scratch(int slots, float** part, unsigned** flags) {
  static void* cached[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) throw std::runtime_error("dcc w4a16: device index out of range");
  const size_t part_bytes = (size_t)slots * 128 * sizeof(float);
  if (cached[dev] == nullptr) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, part_bytes + (size_t)slots * sizeof(unsigned)), "split scratch allocation");
    check_cuda(cudaMemset(p, 0, part_bytes + (size_t)slots * sizeof(unsigned)), "split scratch zeroing");
    cached[dev] = p;
  }
  *part = static_cast<float*>(cached[dev]);
  *flags = reinterpret_cast<unsigned*>(static_cast<char*>(cached[dev]) + part_bytes);
}

// K ranges per tail tile for v8: the largest of 4, 3, 2 with split * tail <= blocks and K / 128 divisible; 1 (plain
// v7) when none fits or there is no tail.
inline int tail_split(int tiles, int blocks, int K) {
  const int tail = tiles % blocks;
  if (tiles <= blocks || tail == 0) return 1;
  for (int c = 4; c >= 2; --c)
    if (c * tail <= blocks && (K / 128) % c == 0) return c;
  return 1;
}

// Persistent grid: the resident blocks, at most one per row tile; allow_split (v8, benchmark only) cuts the last
// round's tiles in K.
template <typename T, int WARPS>
void launch_lean_persist(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                         void* out, int M, int N, int K, int gshift, cudaStream_t stream, bool allow_split = false) {
  if (!lean_fits(M, N, K, 1))
    throw std::invalid_argument("dcc w4a16: lean GEMV kernel does not fit this problem (needs M <= 8, K % 128 == 0, "
                                "N % 16 == 0)");
  const int tiles = N / 16, slots = lean_persist_slots<T, WARPS>();
  const int blocks = tiles < slots ? tiles : slots;
  const int split = allow_split ? tail_split(tiles, blocks, K) : 1;
  float* part = nullptr;
  unsigned* flags = nullptr;
  if (split > 1) split_scratch(slots, &part, &flags);
  gemv_lean_persist_kernel<T, WARPS><<<blocks, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
      static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift, split, part,
      flags);
  check_cuda(cudaGetLastError(), "persistent lean GEMV kernel launch");
}

}  // namespace

}  // namespace dcc_w4a16
