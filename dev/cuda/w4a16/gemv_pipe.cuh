// GEMV v5 (benchmark only; csrc/w4a16/DESIGN.md): the fused W4A16 product for M <= MC (MC in {1, 2, 4, 8}), with the weights streamed
// through a per-warp cp.async ring in shared memory and a persistent grid.
//
// Same mapping, mma and k order as fused_w4a16_kernel<T, 1, ...> (gemv_fused.cuh): a row tile is 16 output rows;
// a warp iteration `it` covers the tile's 16 rows x 128 k (lane (g, t): the 16-byte chunks of rows g and g+8 at
// k0 = 128*it + 32*t); warp w of a block takes the iterations it = w + j*WARPS of every tile, j < n_w.
// What changes:
//  - The ring lives in shared memory, filled by cp.async (weights 16 B .cg per lane and row, scales 8 B per lane),
//    STAGES - 1 iterations ahead per warp. In-flight bytes no longer cost registers, so every warp keeps several
//    iterations in flight at full occupancy. Each lane reads back its own weight chunks; the scales of the slot are
//    shared by the warp (a __syncwarp after cp.async.wait_group orders them).
//  - Persistent grid: min(tiles, resident blocks) blocks, block b takes the tiles b, b + grid, ...; the ring runs on
//    across tile boundaries, so the next tile's loads are in flight while a tile's partial sums are reduced.
//  - The activations of the warp's iterations (the same for every tile, since warp w always takes it = w + j*WARPS)
//    are copied to shared memory once per block (commit group 0), not once per tile.
//  - Dequantisation by dequant_chunk (one LOP3 per pair, one shift per word for fp16): bit-identical weights.
// Per tile, the WARPS partial C fragments are reduced in a fixed order (warp 0..WARPS-1) through shared memory,
// double-buffered so that one __syncthreads per tile suffices; fp32 throughout, one rounding per output.
#pragma once

#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <cstddef>
#include <map>

#include "common.cuh"
#include "util.h"
#include "variants.h"

namespace dcc_w4a16 {

namespace {

// cp.async (sm_80+) to a shared-memory address (the 32-bit shared window, __cvta_generic_to_shared): 16 bytes
// bypassing L1 (.cg) / 16 or 8 bytes through L1 (.ca); `valid` false writes zeros and reads nothing.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16_cg(unsigned s, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async16_ca(unsigned s, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async8_ca(unsigned s, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(s), "l"(gmem), "r"(valid ? 8 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

constexpr int kPipeSlotBytes = 1024 + 256;  // wa[32 lanes] | wb[32 lanes] (16 B each) | s[4 t][16] | sz[4 t][16]

__host__ __device__ constexpr int pipe_mcp(int mc) { return mc < 2 ? 2 : mc; }

template <int WARPS, int STAGES, int MC>
size_t pipe_smem_bytes(int K) {
  const int KI = (K + 127) / 128;
  const int nw = (KI + WARPS - 1) / WARPS;  // most iterations of one warp per tile
  return (size_t)2 * WARPS * 16 * pipe_mcp(MC) * 4 +   // reduction, two buffers
         (size_t)WARPS * STAGES * kPipeSlotBytes +      // rings
         (size_t)WARPS * nw * MC * 256;                 // activations of each warp's iterations
}

template <typename T, int WARPS, int STAGES, int MC>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_pipe_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const T* __restrict__ scales,
                     const T* __restrict__ szeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N,
                     int K, int gshift) {
  static_assert(STAGES >= 2, "ring of at least two slots");
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  constexpr int MCP = pipe_mcp(MC);
  extern __shared__ __align__(16) unsigned char smem[];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int KI = (K + 127) >> 7;
  const int nw_max = (KI + WARPS - 1) / WARPS;
  const int n_w = warp < KI ? (KI - warp + WARPS - 1) / WARPS : 0;
  const int n_tiles = (N + 15) >> 4;
  const int bx = blockIdx.x, nblk = gridDim.x;
  const int my_tiles = bx < n_tiles ? (n_tiles - bx + nblk - 1) / nblk : 0;
  const int mrows = M < MC ? M : MC;

  float* red = reinterpret_cast<float*>(smem);  // [2][WARPS][16][MCP]
  unsigned char* ring = smem + (size_t)2 * WARPS * 16 * MCP * 4 + (size_t)warp * STAGES * kPipeSlotBytes;
  T* xs = reinterpret_cast<T*>(smem + (size_t)2 * WARPS * 16 * MCP * 4 + (size_t)WARPS * STAGES * kPipeSlotBytes) +
          (size_t)warp * nw_max * MC * 128;  // [j][m][128]

  // Activations of this warp's iterations, rows >= M and k >= K zero-filled: part of commit group 0.
  for (int c = lane; c < n_w * MC * 16; c += 32) {
    const int j = c / (MC * 16), rem = c - j * (MC * 16), m = rem >> 4, c16 = rem & 15;
    const int k = (warp + j * WARPS) * 128 + 8 * c16;
    const bool ok = m < M && k < K;
    cp_async16_ca(smem_addr(xs + (size_t)(j * MC + m) * 128 + 8 * c16), ok ? x + (size_t)m * K + k : x, ok);
  }

  // Weight chunks of lane (g, t) relative to the tile's first qweight row and the iteration: row n = nb + g has
  // n4 = nb/4 + g/4, r = g%4; row n + 8 has n4 + 2. A tile is 4*K8 chunks of qweight, an iteration 16 chunks.
  // Offsets are 32-bit (the launcher checks N*K/16 < 2^31 chunks and Kg*N < 2^31 scales).
  const int K8 = K >> 3;
  const unsigned rowB = 2 * K8;
  const int it_lim = (K - 32 * t + 127) >> 7;  // iterations with k0 = 128*it + 32*t < K
  // Scales: lane copies 4 values (8 bytes): tensor lane/16, k-quarter tq = (lane/4)%4, rows 4*(lane%4) .. +3 of
  // the group (128*it + 32*tq) >> gshift = it * (128 >> gshift) + (32*tq >> gshift).
  const int s_tq = (lane >> 2) & 3, s_c = lane & 3;
  const T* s_src = (lane >> 4) ? szeros : scales;
  const int s_step = (128 >> gshift) * N;  // one iteration
  const int s_it_lim = (K - 32 * s_tq + 127) >> 7;
  const int s_dst = 1024 + 128 * (lane >> 4) + 32 * s_tq + 8 * s_c;

  // Issue state: the next item's offsets, advanced incrementally (one item: +WARPS iterations of k; a new tile:
  // +gridDim.x tiles, back to this warp's first iteration).
  const unsigned q_item = 16 * WARPS, s_item = s_step * WARPS;  // the tile steps may wrap: unsigned arithmetic
  const unsigned q_tile = gridDim.x * 4 * K8 - q_item * n_w, s_tile = gridDim.x * 16 - s_item * n_w;
  int iss_left = my_tiles * n_w, iss_j = 0, iss_slot = 0, iss_it = warp, iss_nb = blockIdx.x * 16;
  unsigned iss_q = blockIdx.x * 4 * K8 + 16 * warp + (g >> 2) * K8 + 2 * (g & 3) + (t & 1) + 8 * (t >> 1);
  unsigned iss_s = ((32 * s_tq) >> gshift) * N + warp * s_step + blockIdx.x * 16 + 4 * s_c;
  const unsigned ring_s = smem_addr(ring);
  unsigned iss_sl = ring_s;  // shared address of slot iss_slot
  auto issue_next = [&]() {
    if (iss_left > 0) {
      const bool kok = iss_it < it_lim;
      const bool okA = kok && iss_nb + g < N, okB = kok && iss_nb + 8 + g < N;
      cp_async16_cg(iss_sl + 16 * lane, qw + (okA ? iss_q : 0u), okA);
      cp_async16_cg(iss_sl + 512 + 16 * lane, qw + (okB ? iss_q + rowB : 0u), okB);
      const bool sok = iss_it < s_it_lim && iss_nb + 4 * s_c < N;
      cp_async8_ca(iss_sl + s_dst, s_src + (sok ? iss_s : 0u), sok);
      --iss_left;
      const bool wrap = ++iss_j == n_w;
      iss_j = wrap ? 0 : iss_j;
      iss_it = wrap ? warp : iss_it + WARPS;
      iss_nb += wrap ? 16 * (int)gridDim.x : 0;
      iss_q += wrap ? q_tile + q_item : q_item;
      iss_s += wrap ? s_tile + s_item : s_item;
    }
    iss_slot = iss_slot == STAGES - 1 ? 0 : iss_slot + 1;
    iss_sl = ring_s + iss_slot * kPipeSlotBytes;
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue_next();

  const int xrow = g < mrows ? g : 0;  // B columns >= M are never stored; read a valid row for them
  const T* xw = xs + (size_t)xrow * 128 + 32 * t;
  int slot = 0;
  for (int i = 0; i < my_tiles; ++i) {
    const int nb = ((int)blockIdx.x + i * (int)gridDim.x) * 16;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < n_w; ++j) {
      cp_async_wait<STAGES - 2>();
      __syncwarp();
      issue_next();
      const unsigned char* sl = ring + slot * kPipeSlotBytes;
      if (++slot == STAGES) slot = 0;
      const uint4 wa = *reinterpret_cast<const uint4*>(sl + 16 * lane);
      const uint4 wb = *reinterpret_cast<const uint4*>(sl + 512 + 16 * lane);
      const T* ss = reinterpret_cast<const T*>(sl + 1024);
      const T2 sa2 = H::broadcast(ss[16 * t + g]), sb2 = H::broadcast(ss[16 * t + 8 + g]);
      const T2 za2 = H::broadcast(ss[64 + 16 * t + g]), zb2 = H::broadcast(ss[64 + 16 * t + 8 + g]);
      const uint4* xv = reinterpret_cast<const uint4*>(xw + (size_t)j * MC * 128);
      uint4 xq[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xq[q] = xv[q];
      uint32_t da[16], db[16];
      dequant_chunk<T>(wa, sa2, za2, da);
      dequant_chunk<T>(wb, sb2, zb2, db);
#pragma unroll
      for (int s = 0; s < 8; ++s)
        mma_16816<T>(acc, da[2 * s], db[2 * s], da[2 * s + 1], db[2 * s + 1], word_of(xq[s >> 1], (2 * s) & 3),
                     word_of(xq[s >> 1], (2 * s + 1) & 3));
    }
    // C fragment: c0/c1 = (row g, cols 2t, 2t+1), c2/c3 = (row g+8, same cols); rows are n, cols are m.
    float* rb = red + (size_t)(i & 1) * WARPS * 16 * MCP;
    if (2 * t < MCP) {
      float* rw = rb + (size_t)warp * 16 * MCP;
      rw[g * MCP + 2 * t] = acc[0];
      rw[g * MCP + 2 * t + 1] = acc[1];
      rw[(g + 8) * MCP + 2 * t] = acc[2];
      rw[(g + 8) * MCP + 2 * t + 1] = acc[3];
    }
    __syncthreads();  // the other buffer was last read before this barrier's previous instance: no second barrier
    for (int e = threadIdx.x; e < 16 * mrows; e += WARPS * 32) {
      const int row = e & 15, m = e >> 4;
      float sum = 0.f;
#pragma unroll 8
      for (int w = 0; w < WARPS; ++w) sum += rb[((size_t)w * 16 + row) * MCP + m];
      const int n = nb + row;
      if (n < N) {
        if (bias != nullptr) sum += H::to_float(bias[n]);
        out[(size_t)m * N + n] = H::from_float(sum);
      }
    }
  }
  cp_async_wait<0>();
}

// Per (device, kernel, smem bytes): raise the dynamic shared-memory limit once and cache the resident blocks per SM.
struct PipeLaunchInfo {
  int blocks_per_sm = 0;
  int sms = 0;
};

template <typename Kern>
PipeLaunchInfo pipe_launch_info(Kern kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, PipeLaunchInfo> cache;  // per kernel, device, smem
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, smem);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  PipeLaunchInfo info;
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "smem attribute");
  check_cuda(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev), "SM count");
  if (smem <= (size_t)optin) {
    if (smem > 48 * 1024)
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "pipelined GEMV smem attribute");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel, threads, smem),
               "pipelined GEMV occupancy");
  }
  cache[key] = info;
  return info;
}

// Launches gemv_pipe_kernel for M <= MC; returns false (nothing launched) when its shared memory does not fit.
// max_bps: blocks per SM of the persistent grid (0: as many as are resident); persistent false: one block per tile.
template <typename T, int WARPS, int STAGES, int MC>
bool launch_pipe(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                 void* out, int M, int N, int K, int gshift, bool persistent, int max_bps, cudaStream_t stream) {
  if (M > MC) throw std::invalid_argument("dcc w4a16: pipelined GEMV kernel takes M <= " + std::to_string(MC));
  // 32-bit chunk and scale offsets in the kernel (with headroom for one tile step past the end)
  constexpr size_t kLim = (size_t)1 << 31;
  if ((size_t)N * (size_t)K / 8 + (size_t)K >= kLim || (size_t)(K / 32 + 8) * (size_t)N >= kLim) return false;
  const size_t smem = pipe_smem_bytes<WARPS, STAGES, MC>(K);
  auto kernel = gemv_pipe_kernel<T, WARPS, STAGES, MC>;
  const PipeLaunchInfo info = pipe_launch_info(kernel, WARPS * 32, smem);
  if (info.blocks_per_sm <= 0) return false;
  const int tiles = (N + 15) / 16;
  int grid = tiles;
  if (persistent) {
    const int bps = max_bps > 0 && max_bps < info.blocks_per_sm ? max_bps : info.blocks_per_sm;
    grid = tiles < bps * info.sms ? tiles : bps * info.sms;
  }
  kernel<<<grid, WARPS * 32, smem, stream>>>(static_cast<const T*>(x), static_cast<const uint4*>(qweight),
                                             static_cast<const T*>(scales), static_cast<const T*>(szeros),
                                             static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, gshift);
  check_cuda(cudaGetLastError(), "pipelined GEMV kernel launch");
  return true;
}

}  // namespace

}  // namespace dcc_w4a16
