// Device helpers shared by the W4A8 mma.sync kernels: PTX wrappers (16-byte loads, cp.async, ldmatrix,
// mma.m16n8k32.s8), the QServe qweight unpack into mma A fragments, and the exact epilogue.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w4a8.h"

namespace dcc_w4a8 {

// Kernel arguments (device pointers as in w4a8.h). s1_szeros is used iff group == 0; s2_* iff group > 0.
struct GemmArgs {
  const int8_t* xq;
  const __half* ascale;
  const __half* asum;
  const uint8_t* qweight;
  const __half* s1;
  const __half* szeros;
  const uint8_t* s2s;
  const uint8_t* s2z;
  __half* out;
  int M, N, K, group;
  int32_t* slots;      // split-K partial sums int32 [S][M][N] (null when S == 1)
  uint32_t* counters;  // one arrival counter per output tile; zero on entry, reset to zero by the last arriver
  int S;               // number of K splits
};

constexpr uint32_t kLowNibbles = 0x0F0F0F0Fu;

// Workspace: [kMaxCounters uint32 arrival counters][split-K int32 slots S x M x N]. The counters sit at a fixed
// place and every kernel leaves them zero, so calls of any shape share one region that was zeroed once (slots of an
// earlier call may hold anything). A call that would need more counters runs unsplit.
constexpr int kMaxCounters = 16384;
constexpr size_t kCounterBytes = kMaxCounters * sizeof(uint32_t);
constexpr size_t kSlotsOffset = kCounterBytes;

// 16-byte weight load that bypasses L1 (weights are read once). asm volatile keeps the load where it is written:
// ptxas otherwise sinks loads next to their use and only one is in flight (csrc/w4a16/DESIGN.md, v0).
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ldg_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of 16 bytes of which the first `bytes` (0..16) are read and the rest zero-filled.
__device__ __forceinline__ void cp_async_n(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_u32(dst)), "l"(src), "r"(bytes) : "memory");
}
// cp.async of 16 bytes, zero-filled when !valid (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  cp_async_n(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// d += a (16x32 s8, row) * b (32x8 s8, col), s32 accumulate (integer: exact, any order).
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Level-2 parameters of one lane for one group: s2 bytes j = 0..3 belong to channels g, g+8, g+16, g+24 of the
// 32-row tile (the [4, 8] -> [8, 4] reorder of the layout). w8 = q*s2 + z2 with z2 = -z*s2 the stored int8, and
// the layout guarantees w8 in [-128, 127]; so w8 + 128 = q*s2 + (z2 + 128) lies in [0, 255] for every byte and
// one 32-bit multiply-add over four bytes has no carries. XOR 0x80 per byte then turns the offset-binary byte
// w8 + 128 into the two's-complement int8 w8.
struct Level2 {
  uint32_t s[4];  // s2 of channel g + 8j (unsigned byte)
  uint32_t c[4];  // (z2 + 128) of channel g + 8j, replicated into all four bytes
};

__device__ __forceinline__ Level2 level2(uint32_t scales, uint32_t zeros) {
  Level2 l;
  const uint32_t zoff = zeros ^ 0x80808080u;   // z2 + 128 (mod 256) per byte
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    l.s[j] = (scales >> (8 * j)) & 0xFFu;
    l.c[j] = __byte_perm(zoff, 0, 0x1111u * j);
  }
  return l;
}

// One lane's 16 bytes of a 32x32 qweight tile -> mma A fragments of the two 16-row slabs (rows 0-15 = low nibbles,
// rows 16-31 = high nibbles). Bytes 0-3: (row g, k 4t..4t+3), 4-7: (g+8, 4t..), 8-11: (g, 16+4t..), 12-15:
// (g+8, 16+4t..): exactly the A fragment a0..a3 of m16n8k32 (g = lane/4, t = lane%4).
template <bool kGrouped>
__device__ __forceinline__ void unpack_tile(const uint4 w, const Level2& l2, uint32_t (&lo)[4], uint32_t (&hi)[4]) {
  const uint32_t r[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo[i] = r[i] & kLowNibbles;
    hi[i] = (r[i] >> 4) & kLowNibbles;
    if constexpr (kGrouped) {
      const int j = i & 1;   // a0/a2: row g (channel byte 0 / 2), a1/a3: row g+8 (byte 1 / 3)
      lo[i] = (lo[i] * l2.s[j] + l2.c[j]) ^ 0x80808080u;
      hi[i] = (hi[i] * l2.s[j + 2] + l2.c[j + 2]) ^ 0x80808080u;
    }
  }
}

// The epilogue in QServe's instruction order (kernels/csrc/qgemm/w4a8_per_chn|w4a8_per_group/gemm_cuda.cu @ de6a2ec,
// built with --use_fast_math; its sm_90 SASS: I2FP.F32.S32, FMUL, FMUL, FFMA, F2FP), so that the outputs are
// bit-identical to QServe's kernels and to dcc.targets.qserve.numerics given the same int8 activations:
//   per channel  fp16(fma(as, fl(s1 * float(psum)), -fl(sz * asum)))      (ptxas contracts QServe's mul + sub)
//   groups       fp16(fl(float(psum) * fl(s1 * as)))                       (s1 * as is exact in float)
// float(psum) rounds to nearest (exact below 2^24). The explicit _rn intrinsics keep nvcc from contracting
// differently; QServe's .ftz changes nothing after the fp16 rounding (no operand is a float subnormal).
__device__ __forceinline__ float qserve_epilogue_f(float pf, float s1, float sz, float as, float am, bool per_channel) {
  return per_channel ? __fmaf_rn(as, __fmul_rn(s1, pf), -__fmul_rn(sz, am)) : __fmul_rn(pf, __fmul_rn(s1, as));
}

__device__ __forceinline__ __half epilogue_vals(int psum, __half s1, __half sz, __half as, __half am,
                                               bool per_channel) {
  return __float2half_rn(qserve_epilogue_f(__int2float_rn(psum), __half2float(s1), __half2float(sz),
                                           __half2float(as), __half2float(am), per_channel));
}

// Kept as a name for the kernels that take their scales from shared memory: the same value.
__device__ __forceinline__ __half epilogue_fast(int psum, __half s1, __half sz, __half as, __half am,
                                               bool per_channel) {
  return epilogue_vals(psum, s1, sz, as, am, per_channel);
}

__device__ __forceinline__ __half epilogue(int psum, int m, int n, const GemmArgs& p) {
  const bool pc = p.group == 0;
  return epilogue_vals(psum, p.s1[n], pc ? p.szeros[n] : __half(), p.ascale[m], pc ? p.asum[m] : __half(), pc);
}

// 2-byte loads kept where they are written (asm volatile; ptxas would otherwise sink them to their use), so that a
// kernel can request its epilogue scales early and their DRAM latency overlaps the weight stream instead of
// following it: .nc for the layer's constants, a plain load for what the previous kernel wrote (token scales).
__device__ __forceinline__ __half ldg_h(const __half* p) {
  uint16_t v;
  asm volatile("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
  return __ushort_as_half(v);
}

__device__ __forceinline__ __half ld_h(const __half* p) {
  uint16_t v;
  asm volatile("ld.global.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
  return __ushort_as_half(v);
}

// Split-K: this CTA has written its int32 partials for the tile (rows m0.., columns n0..) into slot blockIdx's
// split; the last CTA of the tile to arrive sums the S slots (integer addition: the result does not depend on the
// arrival order) and writes the fp16 outputs. All threads of the block must call it.
__device__ __forceinline__ void splitk_finish(const GemmArgs& p, int tile_id, int m0, int mrows, int n0, int ncols) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t prev = atomicAdd(p.counters + tile_id, 1u);
    last = (prev == static_cast<uint32_t>(p.S - 1));
    if (last) p.counters[tile_id] = 0;   // ready for the next call
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const size_t plane = static_cast<size_t>(p.M) * p.N;
  for (int e = threadIdx.x; e < mrows * ncols; e += blockDim.x) {
    const int m = m0 + e / ncols, n = n0 + e % ncols;
    if (m >= p.M || n >= p.N) continue;
    const int32_t* s = p.slots + static_cast<size_t>(m) * p.N + n;
    int acc = 0;
    for (int z = 0; z < p.S; ++z) acc += __ldcg(s + z * plane);
    p.out[static_cast<size_t>(m) * p.N + n] = epilogue(acc, m, n, p);
  }
}

// Checks the pointers and shape of a gemm_mma call and fills p (S = 1, no workspace); cudaErrorInvalidValue if
// they break a rule of w4a8.h (gemm_mma.cu; also used by dev/cuda/w4a8).
cudaError_t make_gemm_args(GemmArgs& p, const void* xq, const void* ascale, const void* asum, const void* qweight,
                           const void* s1_scales, const void* s1_szeros, const void* s2_scales, const void* s2_zeros,
                           void* out, int M, int N, int K, int group);

// Launchers (gemm_splitk.cu, gemm_tile.cu); arguments already checked by gemm_mma.
// variant: split-K block shape (0 = default, or kSplitkWideShape below, M <= 16); force_s > 0: that many K splits.
cudaError_t launch_splitk(const GemmArgs& p, void* workspace, size_t ws_bytes, cudaStream_t stream, int variant = 0,
                          int force_s = 0);
size_t splitk_workspace(int M, int N, int K, int group, int variant = 0, int force_s = 0);
cudaError_t launch_tile(const GemmArgs& p, void* workspace, size_t ws_bytes, cudaStream_t stream);
size_t tile_workspace(int M, int N, int K, int group);
int splitk_max_m();
int splitk_slice_tiles(int M);   // the most k tiles one split-K CTA can stage for this M
// The split-K kernel's wide block shape (16 warps, 8 tiles in flight; gemm_mma's choice at M <= 8 where the cluster
// GEMV does not run), by its number in the measured table of DESIGN.md.
constexpr int kSplitkWideShape = 4;
int splitk_variant_occupancy(int variant, int MT, bool grouped);   // CTAs per SM of shape 0 or kSplitkWideShape
// K splits of a split-K launch for (M, N, K) with `occupancy` CTAs per SM of a block shape of `warps` warps;
// force_s > 0: that many, raised to what the staged slice needs (gemm_splitk.cu; also used by dev/cuda/w4a8).
int splitk_splits(int M, int N, int K, int occupancy, int warps, int force_s);
// Cluster GEMV (gemm_gemv.cu; sm_90+), M <= gemv_max_m(); variant: block shape (0 = chosen per layer); force_s > 0:
// that many K splits (a power of two <= 8). cudaErrorNotSupported where it is not built or the GPU is older.
cudaError_t launch_gemv(const GemmArgs& p, cudaStream_t stream, int variant, int force_s);
int gemv_max_m();

}  // namespace dcc_w4a8
