// GEMV v7 (DESIGN.md): the lean kernel (v6) on a persistent grid, the default for M <= 8 where a layer has between
// one and two rounds of row tiles for the resident blocks. Included by gemv.cu.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "gemv_fused.cuh"

namespace dcc_w4a16 {

namespace {
// gemv_lean_kernel (RT = 1, U = 1) with a persistent grid, for layers of many row tiles (N = 14336 has 896 tiles:
// 3.4 rounds of the 264 resident blocks of the non-persistent kernel, each block 2 iterations per warp). Block b
// takes the tiles b, b + gridDim.x, ...; each warp's ring slot is refilled across the tile boundary (the next tile's
// first loads are in flight while the block reduces the current tile), and the reduction buffer is double-buffered
// so that one __syncthreads per tile suffices (buffer i&1 was last read before the previous tile's barrier). Same
// products and reduction order as gemv_lean_kernel.
template <typename T, int WARPS, bool GLU = false>
__global__ void __launch_bounds__(WARPS * 32, (2048 / 2) / (WARPS * 32))
    gemv_lean_persist_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                             const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M,
                             int N, int K, int gshift) {
  using H = Half2Of<T>;
  __shared__ float4 red[2][WARPS][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = N >> 4, G = (int)gridDim.x, b = (int)blockIdx.x;
  const int my_tiles = (b < tiles) ? (tiles - b + G - 1) / G : 0;
  const int KI = K >> 7;
  const int n_it = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;  // iterations per tile
  const unsigned s_it = (unsigned)(128 >> gshift) * (unsigned)N;  // scale rows per 128-k chunk, in elements

  // 32-bit element offsets from the (constant) base pointers instead of four 64-bit pointers: five registers fewer,
  // which the 64-register budget of two 512-thread blocks per SM needs (no spills).
  unsigned oq, os, ox;
  // seek: this warp's offsets at its first iteration (128-k chunk c0 = warp) of its block's tile number `it`
  // (tiles b, b + G, ...).
  auto seek = [&](int it) {
    const unsigned c0 = warp;
    const unsigned n = (b + it * G) * 16 + g;
    oq = (n >> 2) * (unsigned)(K >> 3) + 2 * (n & 3) + (t & 1) + 8 * (t >> 1) + 16 * c0;
    os = (unsigned)((32 * t) >> gshift) * (unsigned)N + c0 * s_it + n;
    ox = (unsigned)(g < M ? g : M - 1) * (unsigned)K + 32 * t + 128 * c0;
  };

  uint4 wa, wb, xr[4];
  T sa, sb, za, zb;
  int left = my_tiles * n_it, j_iss = 0, item = 0;
  // issue: the loads of the next iteration; past a tile's last one, seek the next tile, so that the ring runs across
  // tile boundaries and the next loads are in flight during each block reduction.
  auto issue_w = [&]() {   // the weights, scales and zeros (constant: loadable before the PDL wait)
    wa = ld_stream_u4(qw + oq);
    wb = ld_stream_u4(qw + oq + 2 * (K >> 3));
    sa = scales[os];
    sb = scales[os + 8];
    za = szeros[os];
    zb = szeros[os + 8];
  };
  auto issue_x = [&]() {
#pragma unroll
    for (int q = 0; q < 4; ++q) xr[q] = ld_act_u4(x + ox + 8 * q);
  };
  auto advance = [&]() {
    oq += 16 * WARPS;
    os += s_it * WARPS;
    ox += 128 * WARPS;
    if (--left > 0 && ++j_iss == n_it) {
      j_iss = 0;
      seek(++item);
    }
  };
  auto issue = [&]() {
    issue_w();
    issue_x();
    advance();
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
  // PDL (../common/pdl.cuh): the first iteration's weights are loaded, and the next kPrefetchIters' of the first
  // tile prefetched into L2, while the previous kernel finishes; the activations after the wait
  dcc_pdl::launch_dependents();
  if (left > 0) {
    seek(0);
    issue_w();
    for (int j = 1; j < n_it && j <= kPrefetchIters; ++j) {
      dcc_pdl::prefetch_l2(qw + oq + j * 16 * WARPS);
      dcc_pdl::prefetch_l2(qw + oq + j * 16 * WARPS + 2 * (K >> 3));
    }
  }
  dcc_pdl::wait();
  if (left > 0) {
    issue_x();
    advance();
  }

  for (int i = 0; i < my_tiles; ++i) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < n_it; ++j) step(acc);
    red[i & 1][warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    reduce_store<T, 1, WARPS, GLU>(reinterpret_cast<const float*>(&red[i & 1][0][0]), bias, out, M, N,
                                   (b + i * G) * 16);
  }
}

// SMs x resident blocks of `kernel` launched with `threads` threads on the current device, cached per device in
// `cache` (a benign race: every writer stores the same value).
template <typename Kernel>
int resident_slots(Kernel kernel, int threads, int (&cache)[64]) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) throw std::runtime_error("dcc w4a16: device index out of range");
  if (cache[dev] == 0) {
    int sms = 0, bps = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "SM count");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, kernel, threads, 0), "occupancy");
    cache[dev] = sms * (bps > 0 ? bps : 1);
  }
  return cache[dev];
}

// Resident blocks of gemv_lean_persist_kernel<T, WARPS, GLU> on the current device.
template <typename T, int WARPS, bool GLU = false>
int lean_persist_slots() {
  static int cached[64] = {};
  return resident_slots(gemv_lean_persist_kernel<T, WARPS, GLU>, WARPS * 32, cached);
}

// Persistent grid: the resident blocks, at most one per row tile.
template <typename T, int WARPS, bool GLU = false>
void launch_lean_persist(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                         void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  if (!lean_fits(M, N, K, 1))
    throw std::invalid_argument("dcc w4a16: lean GEMV kernel does not fit this problem (needs M <= 8, K % 128 == 0, "
                                "N % 16 == 0)");
  const int tiles = N / 16, slots = lean_persist_slots<T, WARPS, GLU>();
  const int blocks = tiles < slots ? tiles : slots;
  check_cuda(dcc_pdl::launch(gemv_lean_persist_kernel<T, WARPS, GLU>, dim3(blocks), dim3(WARPS * 32), 0, stream,
                             static_cast<const T*>(x), static_cast<const uint4*>(qweight),
                             static_cast<const T*>(scales), static_cast<const T*>(szeros),
                             static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift),
             "persistent lean GEMV kernel launch");
}

}  // namespace

}  // namespace dcc_w4a16
