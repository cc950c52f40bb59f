// The split-K W4A8 kernel template (gemm_splitk.cu launches its two block shapes; dev/cuda/w4a8 instantiates the
// others measured). See gemm_splitk.cu for the scheme.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dcc_w4a8 {
namespace splitk {

constexpr int kSmemX = 40 * 1024;         // bound on the staged activation slice (bytes)
constexpr int kRedStride = 36;            // int32 per token row of the reduction buffer (36: no bank conflicts)

template <int MT>
constexpr int max_slice_tiles() { return (kSmemX / (8 * MT) - 16) / 32; }

template <int MT, int kWarps>
__host__ __device__ constexpr int smem_bytes(int tiles) {
  const int xs = 8 * MT * (tiles * 32 + 16);
  const int red = kWarps * 8 * MT * kRedStride * 4;
  return xs > red ? xs : red;
}

// kWarps warps per CTA, kRing weight tiles in flight per warp.
template <int MT, bool kGrouped, int kWarps, int kRing>
__global__ void __launch_bounds__(kWarps * 32) splitk_kernel(const GemmArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int nt = blockIdx.x, split = blockIdx.y, m0 = blockIdx.z * 8 * MT;
  const int ktiles = p.K / 32;
  const int kb = static_cast<int>(static_cast<long long>(split) * ktiles / p.S);
  const int ke = static_cast<int>(static_cast<long long>(split + 1) * ktiles / p.S);
  const int stride = (ke - kb) * 32 + 16;   // bytes per staged token row (+16: conflict-free fragment reads)

  // weight ring first, so that these loads are in flight while the activations are staged
  const int cnt = (ke - kb - warp + kWarps - 1) / kWarps;   // tiles of this warp: kb + warp + i*kWarps
  const uint8_t* wptr = p.qweight + (static_cast<size_t>(nt) * ktiles + kb + warp) * 512 + lane * 16;
  const int gshift = kGrouped ? (p.group == 64 ? 1 : 2) : 0;   // k tiles per group = 1 << gshift
  const uint8_t* s2s = p.s2s + nt * 32 + g * 4;
  const uint8_t* s2z = p.s2z + nt * 32 + g * 4;
  uint4 ring[kRing];
  uint32_t rs[kRing], rz[kRing];
#pragma unroll
  for (int u = 0; u < kRing; ++u) {
    if (u < cnt) {
      ring[u] = ldg_stream(wptr + static_cast<size_t>(u) * kWarps * 512);
      if constexpr (kGrouped) {
        const size_t off = static_cast<size_t>((kb + warp + u * kWarps) >> gshift) * p.N;
        rs[u] = ldg_u32(s2s + off);
        rz[u] = ldg_u32(s2z + off);
      }
    }
  }

  // stage the activation slice: 8*MT token rows x (ke-kb)*32 bytes, rows past M zero
  const int chunks_per_row = (ke - kb) * 2;
  for (int c = threadIdx.x; c < 8 * MT * chunks_per_row; c += blockDim.x) {
    const int r = c / chunks_per_row, cc = c % chunks_per_row;
    const bool valid = m0 + r < p.M;
    const int8_t* src = p.xq + static_cast<size_t>(valid ? m0 + r : 0) * p.K + kb * 32 + cc * 16;
    cp_async16(smem + r * stride + cc * 16, src, valid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  int acc[2][MT][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[s][j][i] = 0;

  const uint8_t* xbase = smem + g * stride + t * 4;
  for (int i0 = 0; i0 < cnt; i0 += kRing) {
#pragma unroll
    for (int u = 0; u < kRing; ++u) {
      const int i = i0 + u;
      if (i < cnt) {
        const uint4 w = ring[u];
        Level2 l2;
        if constexpr (kGrouped) l2 = level2(rs[u], rz[u]);
        if (i + kRing < cnt) {   // refill the slot just consumed
          ring[u] = ldg_stream(wptr + static_cast<size_t>(i + kRing) * kWarps * 512);
          if constexpr (kGrouped) {
            const size_t off = static_cast<size_t>((kb + warp + (i + kRing) * kWarps) >> gshift) * p.N;
            rs[u] = ldg_u32(s2s + off);
            rz[u] = ldg_u32(s2z + off);
          }
        }
        uint32_t lo[4], hi[4];
        unpack_tile<kGrouped>(w, l2, lo, hi);
        const uint8_t* xk = xbase + (warp + i * kWarps) * 32;
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xk + 8 * j * stride);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xk + 8 * j * stride + 16);
          mma_s8(acc[0][j], lo, b0, b1);
          mma_s8(acc[1][j], hi, b0, b1);
        }
      }
    }
  }

  // add the warps' sums: red[warp][token][row] (c0/c1: row g, tokens 2t, 2t+1; c2/c3: row g+8)
  __syncthreads();   // the activation slice is no longer read: reuse its space
  int32_t* red = reinterpret_cast<int32_t*>(smem);
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * s + g + 8 * (i / 2), tok = 8 * j + 2 * t + (i % 2);
        red[(warp * 8 * MT + tok) * kRedStride + row] = acc[s][j][i];
      }
  __syncthreads();
  const int n0 = nt * 32;
  for (int e = threadIdx.x; e < 8 * MT * 32; e += blockDim.x) {
    const int tok = e / 32, row = e % 32, m = m0 + tok;
    int v = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * 8 * MT + tok) * kRedStride + row];
    if (m < p.M) {
      const size_t o = static_cast<size_t>(m) * p.N + n0 + row;
      if (p.S == 1) p.out[o] = epilogue(v, m, n0 + row, p);
      else p.slots[static_cast<size_t>(split) * p.M * p.N + o] = v;
    }
  }
  if (p.S > 1) splitk_finish(p, blockIdx.z * gridDim.x + nt, m0, 8 * MT, n0, 32);
}

// Launch one instantiation with S already chosen (p.S) and the workspace set.
template <int MT, bool kGrouped, int kWarps, int kRing>
cudaError_t launch(const GemmArgs& p, cudaStream_t stream) {
  const int ktiles = p.K / 32;
  const int per = (ktiles + p.S - 1) / p.S;
  if (per > max_slice_tiles<MT>()) return cudaErrorInvalidValue;
  auto kern = splitk_kernel<MT, kGrouped, kWarps, kRing>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       smem_bytes<MT, kWarps>(max_slice_tiles<MT>()));
  if (e != cudaSuccess) return e;
  const dim3 grid(p.N / 32, p.S, (p.M + 8 * MT - 1) / (8 * MT));
  kern<<<grid, kWarps * 32, smem_bytes<MT, kWarps>(per), stream>>>(p);
  return cudaGetLastError();
}

template <int MT, bool kGrouped, int kWarps, int kRing>
int occupancy() {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, splitk_kernel<MT, kGrouped, kWarps, kRing>, kWarps * 32,
                                                    smem_bytes<MT, kWarps>(max_slice_tiles<MT>())) != cudaSuccess)
    return 1;
  return blocks > 1 ? blocks : 1;
}

}  // namespace splitk

}  // namespace dcc_w4a8
