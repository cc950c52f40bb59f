// Benchmark only (csrc/w4a8/DESIGN.md: measured 10-25% slower than split-K at M = 1 and 2x slower at M = 16 on an
// H100; the product's automatic choice never took it, and it left the installed extension).
// W4A8 GEMM for M <= 16 on a persistent "stream-K" grid: the N/32 x K/32 weight tiles, which the QServe layout stores
// contiguously in exactly that order, are cut into one contiguous range per CTA (as many CTAs as fit on the GPU), so
// every CTA streams the same number of bytes and there is no partial last wave. Warps take every W-th tile of their
// CTA's range with a U-deep ring of loads (weights, and the activation B fragments, read from L1/L2: no staging
// barrier) that runs on across row-tile boundaries. When a warp leaves a row tile it adds its int32 sums into a
// zeroed accumulator in the workspace (red.global.add: integer, so the result does not depend on the order) and
// counts the tiles it did; the warp that completes the row tile's K/32 tiles takes the sums back with atomicExch
// (leaving zeros), applies the epilogue and resets the counter.
#include <algorithm>
#include <cstdint>

#include "dev_kernels.cuh"

namespace dcc_w4a8 {
namespace {

// flush the warp's sums for row tile nt (units = tiles it did there); the completing warp writes the outputs
template <int MT>
__device__ __forceinline__ void flush(const GemmArgs& p, int32_t* acc_buf, int nt, int units, int (&acc)[2][MT][4],
                                      int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = 8 * j + 2 * t + (i % 2), row = nt * 32 + 16 * s + g + 8 * (i / 2);
        if (tok < p.M) atomicAdd(acc_buf + tok * p.N + row, acc[s][j][i]);
        acc[s][j][i] = 0;
      }
  __threadfence();
  __syncwarp();
  int last = 0;
  if (lane == 0) last = atomicAdd(p.counters + nt, static_cast<uint32_t>(units)) + units == static_cast<uint32_t>(
                            p.K / 32);
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return;
  __threadfence();
  for (int e = lane; e < 32 * p.M; e += 32) {
    const int tok = e / 32, n = nt * 32 + e % 32;
    const int v = atomicExch(acc_buf + tok * p.N + n, 0);
    p.out[static_cast<size_t>(tok) * p.N + n] = epilogue(v, tok, n, p);
  }
  if (lane == 0) atomicExch(p.counters + nt, 0u);
}

template <int MT, bool kGrouped, int W, int U>
__global__ void __launch_bounds__(W * 32) streamk_kernel(const GemmArgs p, int32_t* acc_buf) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int ktiles = p.K / 32;
  const int total = (p.N / 32) * ktiles;   // < 2^31: N <= kStreamkMaxN
  const int ub = static_cast<int>(1LL * total * blockIdx.x / gridDim.x);
  const int ue = static_cast<int>(1LL * total * (blockIdx.x + 1) / gridDim.x);
  const int first = ub + warp;
  const int cnt = first < ue ? (ue - first + W - 1) / W : 0;
  const int gshift = kGrouped ? (p.group == 64 ? 1 : 2) : 0;

  uint4 rw[U];
  uint32_t rb[U][MT][2];
  uint32_t rs[U], rz[U];
  const uint8_t* wbase = p.qweight + lane * 16;
  auto load = [&](int u, int unit) {
    const int nt = unit / ktiles, kt = unit - nt * ktiles;
    rw[u] = ldg_stream(wbase + static_cast<size_t>(unit) * 512);
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int tok = 8 * j + g;
      const int8_t* xp = p.xq + static_cast<size_t>(tok) * p.K + kt * 32 + 4 * t;
      rb[u][j][0] = tok < p.M ? ldg_u32(xp) : 0u;
      rb[u][j][1] = tok < p.M ? ldg_u32(xp + 16) : 0u;
    }
    if constexpr (kGrouped) {
      const size_t off = static_cast<size_t>(kt >> gshift) * p.N + nt * 32 + 4 * g;
      rs[u] = ldg_u32(p.s2s + off);
      rz[u] = ldg_u32(p.s2z + off);
    }
  };
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < cnt) load(u, first + u * W);

  int acc[2][MT][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[s][j][i] = 0;
  int cur = cnt > 0 ? first / ktiles : -1, units = 0;

  for (int i0 = 0; i0 < cnt; i0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i < cnt) {
        const int unit = first + i * W;
        const int nt = unit / ktiles;
        const uint4 w = rw[u];
        uint32_t b[MT][2];
#pragma unroll
        for (int j = 0; j < MT; ++j) b[j][0] = rb[u][j][0], b[j][1] = rb[u][j][1];
        Level2 l2;
        if constexpr (kGrouped) l2 = level2(rs[u], rz[u]);
        if (i + U < cnt) load(u, unit + U * W);   // refill the slot just consumed
        if (nt != cur) {
          flush<MT>(p, acc_buf, cur, units, acc, lane);
          cur = nt;
          units = 0;
        }
        uint32_t lo[4], hi[4];
        unpack_tile<kGrouped>(w, l2, lo, hi);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          mma_s8(acc[0][j], lo, b[j][0], b[j][1]);
          mma_s8(acc[1][j], hi, b[j][0], b[j][1]);
        }
        ++units;
      }
    }
  }
  if (cnt > 0) flush<MT>(p, acc_buf, cur, units, acc, lane);
}

template <int MT, bool G, int W, int U>
cudaError_t run(const GemmArgs& p, int32_t* acc_buf, cudaStream_t stream) {
  auto kern = streamk_kernel<MT, G, W, U>;
  int occ = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, W * 32, 0) != cudaSuccess || occ < 1) occ = 1;
  const long long total = 1LL * (p.N / 32) * (p.K / 32);
  const int ctas = static_cast<int>(std::min<long long>(total, 1LL * occ * num_sms()));
  kern<<<ctas, W * 32, 0, stream>>>(p, acc_buf);
  return cudaGetLastError();
}

template <int W, int U>
cudaError_t run_shape(const GemmArgs& p, int32_t* acc_buf, cudaStream_t stream) {
  const bool g = p.group > 0;
  if (p.M <= 8) return g ? run<1, true, W, U>(p, acc_buf, stream) : run<1, false, W, U>(p, acc_buf, stream);
  return g ? run<2, true, W, U>(p, acc_buf, stream) : run<2, false, W, U>(p, acc_buf, stream);
}

}  // namespace

// variants (warps per CTA, tiles in flight per warp): 0 = (8, 8) default, 1 = (8, 4), 2 = (4, 8), 3 = (4, 16)
cudaError_t launch_streamk(const GemmArgs& args, void* workspace, size_t ws_bytes, cudaStream_t stream, int variant) {
  if (args.M > kStreamkMaxM || args.N > kStreamkMaxN || !workspace || ws_bytes < kStreamkWorkspace)
    return cudaErrorInvalidValue;
  GemmArgs p = args;
  p.S = 1;
  p.counters = static_cast<uint32_t*>(workspace);
  auto acc_buf = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + kCounterBytes);
  switch (variant) {
    case 0: return run_shape<8, 8>(p, acc_buf, stream);
    case 1: return run_shape<8, 4>(p, acc_buf, stream);
    case 2: return run_shape<4, 8>(p, acc_buf, stream);
    case 3: return run_shape<4, 16>(p, acc_buf, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dcc_w4a8
