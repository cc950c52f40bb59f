// W4A8 GEMM for larger M: CTA tiles of BN channels x BM tokens, a multistage cp.async pipeline over 32-wide k
// tiles (K % 32 == 0 is all it needs), weights as the mma A operand read with one 16-byte shared-memory load per lane
// per 32x32 tile (the QServe layout already is the fragment order), activations as the B operand via ldmatrix from a
// swizzled [BM][32] stage. When the tiles do not fill the GPU, K is split over CTAs (int32 slots, see common.cuh).
#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace dcc_w4a8 {
namespace {

template <int WN_, int WM_, int NT_, int MT_, int STAGES_>
struct Cfg {
  static constexpr int WN = WN_, WM = WM_, NT = NT_, MT = MT_, STAGES = STAGES_;
  static constexpr int kThreads = 32 * WN * WM;
  static constexpr int BN = 32 * NT * WN, BM = 8 * MT * WM;
  static constexpr int kX = BM * 32, kW = BN * 16, kS2 = BN;              // bytes per stage
  static constexpr int kStage = kX + kW + 2 * kS2;
  static constexpr int kSmem = STAGES * kStage;
  static_assert(MT % 2 == 0, "ldmatrix.x4 feeds two 8-token blocks");
};

using Big = Cfg<2, 4, 2, 4, 4>;   // 128 x 128, 8 warps of 64 channels x 32 tokens
using Mid = Cfg<4, 2, 1, 4, 4>;   // 128 channels x 64 tokens, 8 warps of 32 x 32

// x stage: token row r holds two 16-byte chunks, chunk c stored at c ^ bit 2 of r: the 8 rows an ldmatrix reads
// (stride 32 bytes) then hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int xswz(int r, int c) { return r * 32 + ((c ^ ((r >> 2) & 1)) << 4); }

template <class C, bool kGrouped>
__device__ __forceinline__ void load_stage(uint8_t* st, const GemmArgs& p, int kt, int m0, int nt0) {
  const int ktiles = p.K / 32, ntiles = p.N / 32;
  for (int c = threadIdx.x; c < C::BM * 2; c += C::kThreads) {
    const int r = c >> 1, cc = c & 1;
    const bool valid = m0 + r < p.M;
    cp_async16(st + xswz(r, cc), p.xq + static_cast<size_t>(valid ? m0 + r : 0) * p.K + kt * 32 + cc * 16, valid);
  }
  for (int c = threadIdx.x; c < C::BN; c += C::kThreads) {
    const int rt = c >> 5, ln = c & 31;
    const bool valid = nt0 + rt < ntiles;
    cp_async16(st + C::kX + c * 16,
               p.qweight + (static_cast<size_t>(valid ? nt0 + rt : 0) * ktiles + kt) * 512 + ln * 16, valid);
  }
  if constexpr (kGrouped) {
    const size_t grow = static_cast<size_t>(kt * 32 / p.group) * p.N;
    for (int c = threadIdx.x; c < 2 * (C::BN / 16); c += C::kThreads) {
      const int which = c / (C::BN / 16), cc = c % (C::BN / 16);
      const int n = nt0 * 32 + cc * 16;
      const bool valid = n < p.N;
      const uint8_t* src = (which ? p.s2z : p.s2s) + grow + (valid ? n : 0);
      cp_async16(st + C::kX + C::kW + which * C::kS2 + cc * 16, src, valid);
    }
  }
}

template <class C, bool kGrouped>
__global__ void __launch_bounds__(C::kThreads, 2) tile_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wn = warp % C::WN, wm = warp / C::WN;
  const int nt0 = blockIdx.x * (C::BN / 32), m0 = blockIdx.y * C::BM;
  const int ktiles = p.K / 32;
  const int kb = static_cast<int>(static_cast<long long>(blockIdx.z) * ktiles / p.S);
  const int ke = static_cast<int>(static_cast<long long>(blockIdx.z + 1) * ktiles / p.S);

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (kb + s < ke) load_stage<C, kGrouped>(smem + s * C::kStage, p, kb + s, m0, nt0);
    cp_async_commit();
  }

  int acc[C::NT][2][C::MT][4];
#pragma unroll
  for (int r = 0; r < C::NT; ++r)
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int j = 0; j < C::MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][s][j][i] = 0;

  // ldmatrix.x4 lanes: matrix lane/8 = (8-token half, 16-byte chunk); row lane%8
  const int ld_tok = wm * 8 * C::MT + ((lane >> 4) << 3) + (lane & 7), ld_chunk = (lane >> 3) & 1;

  for (int kt = kb; kt < ke; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    {
      const int nk = kt + C::STAGES - 1;
      if (nk < ke) load_stage<C, kGrouped>(smem + ((nk - kb) % C::STAGES) * C::kStage, p, nk, m0, nt0);
      cp_async_commit();
    }
    const uint8_t* st = smem + ((kt - kb) % C::STAGES) * C::kStage;
    uint32_t b[C::MT / 2][4];
#pragma unroll
    for (int jj = 0; jj < C::MT / 2; ++jj) ldmatrix_x4(b[jj], st + xswz(ld_tok + 16 * jj, ld_chunk));
#pragma unroll
    for (int r = 0; r < C::NT; ++r) {
      const int rt = wn * C::NT + r;
      const uint4 w = *reinterpret_cast<const uint4*>(st + C::kX + rt * 512 + lane * 16);
      Level2 l2;
      if constexpr (kGrouped)
        l2 = level2(*reinterpret_cast<const uint32_t*>(st + C::kX + C::kW + rt * 32 + 4 * g),
                    *reinterpret_cast<const uint32_t*>(st + C::kX + C::kW + C::kS2 + rt * 32 + 4 * g));
      uint32_t lo[4], hi[4];
      unpack_tile<kGrouped>(w, l2, lo, hi);
#pragma unroll
      for (int jj = 0; jj < C::MT / 2; ++jj) {
        mma_s8(acc[r][0][2 * jj], lo, b[jj][0], b[jj][1]);
        mma_s8(acc[r][0][2 * jj + 1], lo, b[jj][2], b[jj][3]);
        mma_s8(acc[r][1][2 * jj], hi, b[jj][0], b[jj][1]);
        mma_s8(acc[r][1][2 * jj + 1], hi, b[jj][2], b[jj][3]);
      }
    }
  }
  cp_async_wait<0>();

  // c0/c1: channel row g, tokens 2t, 2t+1; c2/c3: row g+8; slab s adds 16 rows, block j adds 8 tokens
  const size_t plane = static_cast<size_t>(p.M) * p.N;
#pragma unroll
  for (int r = 0; r < C::NT; ++r)
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int j = 0; j < C::MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int n = (nt0 + wn * C::NT + r) * 32 + 16 * s + g + 8 * (i / 2);
          const int m = m0 + wm * 8 * C::MT + 8 * j + 2 * t + (i % 2);
          if (m < p.M && n < p.N) {
            const size_t o = static_cast<size_t>(m) * p.N + n;
            if (p.S == 1) p.out[o] = epilogue(acc[r][s][j][i], m, n, p);
            else p.slots[blockIdx.z * plane + o] = acc[r][s][j][i];
          }
        }
  if (p.S > 1) splitk_finish(p, blockIdx.y * gridDim.x + blockIdx.x, m0, C::BM, nt0 * 32, C::BN);
}

template <class C>
int splits_of(int M, int N, int K) {
  const long long ctas = 1LL * ((N / 32 + C::BN / 32 - 1) / (C::BN / 32)) * ((M + C::BM - 1) / C::BM);
  const int ktiles = K / 32;
  const long long slots = 2LL * num_sms();   // 2 CTAs per SM (launch bounds, 26 KB shared each)
  if (ctas >= slots || ctas > kMaxCounters) return 1;
  return static_cast<int>(std::max(1LL, std::min<long long>(slots / ctas, ktiles / 8)));
}

bool use_big(int M) { return M > 64; }

template <class C, bool kGrouped>
cudaError_t launch(const GemmArgs& p, cudaStream_t stream) {
  auto kern = tile_kernel<C, kGrouped>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.N / 32 + C::BN / 32 - 1) / (C::BN / 32), (p.M + C::BM - 1) / C::BM, p.S);
  kern<<<grid, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class C>
size_t workspace_of(int M, int N, int K) {
  const int S = splits_of<C>(M, N, K);
  if (S == 1) return 0;
  return kSlotsOffset + static_cast<size_t>(S) * M * N * 4;
}

}  // namespace

size_t tile_workspace(int M, int N, int K, int) {
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  return use_big(M) ? workspace_of<Big>(M, N, K) : workspace_of<Mid>(M, N, K);
}

cudaError_t launch_tile(const GemmArgs& args, void* workspace, size_t ws_bytes, cudaStream_t stream) {
  GemmArgs p = args;
  const bool big = use_big(p.M);
  p.S = big ? splits_of<Big>(p.M, p.N, p.K) : splits_of<Mid>(p.M, p.N, p.K);
  if (p.S > 1) {
    if (!workspace || ws_bytes < tile_workspace(p.M, p.N, p.K, p.group)) return cudaErrorInvalidValue;
    p.counters = static_cast<uint32_t*>(workspace);
    p.slots = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + kSlotsOffset);
  }
  const bool grouped = p.group > 0;
  if (big) return grouped ? launch<Big, true>(p, stream) : launch<Big, false>(p, stream);
  return grouped ? launch<Mid, true>(p, stream) : launch<Mid, false>(p, stream);
}

}  // namespace dcc_w4a8
