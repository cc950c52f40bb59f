// GEMV v8 (benchmark only; csrc/w4a16/DESIGN.md, "variants measured and dropped"): the persistent kernel v7 of
// csrc/w4a16/gemv_persist.cuh with the last, partial round of row tiles cut into K ranges on otherwise idle blocks.
// Measured slower than v7 on 14336x4096 (16.2 vs 15.0 us on an H100: the fence, counter and final sum of the parts
// cost more than the half tile saves). Included by gemv_variants.cu (variant lp8_w16).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "gemv_persist.cuh"

namespace dcc_w4a16 {

namespace {
// v7 as in gemv_persist.cuh for the full rounds; then the `tail` = tiles % gridDim.x tiles of the last, partial
// round are cut into `split` K ranges, one per block (split * tail <= gridDim.x), so that no block does a whole extra
// tile while most idle (896 tiles on 264 blocks: 4 tile-times on the critical path become 3.5). Each part stores its
// block-reduced fp32 sums in `part`; the last of a tile's parts to arrive (a counter in `flags`, reset by it for the
// next launch) adds the parts in part order 0..split-1, whichever block computed them, so the result does not
// depend on timing. Needs K / 128 % split == 0.
template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, (2048 / 2) / (WARPS * 32))
    gemv_tail_split_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
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

// v7's grid (the resident blocks of the persistent kernel, at most one per row tile) with the tail split.
template <typename T, int WARPS>
void launch_tail_split(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                       void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (!lean_fits(M, N, K, 1))
    throw std::invalid_argument("dcc w4a16: lean GEMV kernel does not fit this problem (needs M <= 8, K % 128 == 0, "
                                "N % 16 == 0)");
  const int tiles = N / 16, slots = lean_persist_slots<T, WARPS>();
  const int blocks = tiles < slots ? tiles : slots;
  const int split = tail_split(tiles, blocks, K);
  float* part = nullptr;
  unsigned* flags = nullptr;
  if (split > 1) split_scratch(slots, &part, &flags);
  gemv_tail_split_kernel<T, WARPS><<<blocks, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint4*>(qweight), static_cast<const T*>(scales),
      static_cast<const T*>(szeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift, split, part,
      flags);
  check_cuda(cudaGetLastError(), "tail-split GEMV kernel launch");
}

}  // namespace

}  // namespace dcc_w4a16
