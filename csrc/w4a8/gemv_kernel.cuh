// Device side of the cluster GEMV kernel for M <= 16 (gemm_gemv.cu launches it; the scheme is described there).
// Included inside namespace dcc_w4a8 by gemm_gemv.cu (and by a standalone timing harness).
#pragma once

#include <cstdint>

#include "common.cuh"
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include "sm90_ptx.cuh"
#define DCC_GEMV_DEVICE 1
#endif

namespace dcc_w4a8 {
namespace gemv {

constexpr int kRedStride = 36;   // int32 per token row of the sum buffer (36: a warp's adds hit 32 distinct banks)

// Static shared memory of one CTA: the sums of its warps [kRows][8*MT tokens][36], the split-K sums of the outputs
// it writes (1/S of [kRows][M][32]) from each of the S CTAs of its K range ([split][E/S]; the others push theirs),
// and the activation slice's two mbarriers (token rows 0-7 and 8-15). The activation slice itself is dynamic: M
// rows of slice_stride(K range) bytes.
template <int MT, int kWarps, int kRows>
struct Smem {
  int32_t red[kRows * 8 * MT * kRedStride];   // zeroed at the start; each warp adds its sums (red.shared.add)
  int32_t part[kRows * 8 * MT * 32];   // [split][E/S] (S a power of two: E/S exact)
  __half sc[2][kRows * 32];   // the CTA's channel scales s1 and szeros (see scales_aligned)
  __half tk[2][16];           // token scales and sums
  uint64_t xbar[2];   // activation rows 0-7 and 8-15
};

// The epilogue's scales, copied into shared memory by cp.async when the kernel starts (the channels' right away,
// the tokens' after the dependency wait): their DRAM latency then overlaps the weight stream instead of following
// the reduction, and no registers are held for them (a 16-warp CTA must stay within 64 registers to run two per
// SM). 16-byte copies (the CTA's channels are 32-aligned; token rows past M are zero-filled, not read); false where
// a pointer is not 16-byte aligned, and the epilogue then reads global memory.
template <bool kGrouped>
__device__ __forceinline__ bool scales_aligned(const GemmArgs& p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p.s1) | reinterpret_cast<uintptr_t>(p.ascale);
  if (!kGrouped) a |= reinterpret_cast<uintptr_t>(p.szeros) | reinterpret_cast<uintptr_t>(p.asum);
  return (a & 15) == 0;
}

// Bytes per staged activation row for `tiles` k tiles: + 16 so that the 8 rows of a B fragment read fall into
// distinct banks (row stride = 4, 12, 20 or 28 words mod 32).
__host__ __device__ constexpr int slice_stride(int tiles) { return tiles * 32 + 16; }

// One 16-byte weight load per lane per 32x32 tile (the A fragments of its two 16-row slabs), for groups the lane's
// s2 scale / zero words (in the slots that start a group), and where the activations are not staged (MT = 1) the
// lane's two activation words.
template <bool kGrouped>
struct Slot {
  uint4 w;
  uint32_t s2, z2;
  uint32_t b0, b1;
};

// Grid (S, N/(32*kRows)), cluster (S, kC, 1), M <= 8*MT tokens: CTA (z, rb) takes the kRows 32-channel row tiles
// from nt = rb*kRows over the k tiles [z*KT/S, (z+1)*KT/S); warp w takes row tile w % kRows and every kWK-th k tile
// of that range from w / kRows (kWK = kWarps / kRows), with kU tiles in flight in registers. Grouped weights (kGT
// k tiles per group: 2 for g64, 4 for g128) are dealt out by whole groups instead: the ranges split at group
// boundaries and warp w takes every kWK-th group (kGT consecutive tiles) from w / kRows, so that one s2 / z2 load
// pair serves kGT tiles (with a pair per tile, 4096x14336 g128 at M = 1 took 15.6-16.0 us, and 11.2 with the s2
// loads replaced by constants; H200). MT = 1 (M <= 8): the lane's activation words (token g only) are loaded with
// its weights. MT = 2 (M <= 16; token_groups in gemm_gemv.cu says where, from M = 5 on small layers): four words
// per lane per tile would outnumber the weight loads, so the CTA's activation slice (M rows x its k range) is
// staged in shared memory by bulk copies after the weight loads are issued, and the B fragments are read from
// there.
// 16-warp CTAs with 4 tiles in flight are the shapes meant to run two per SM: at most 64 registers (the grouped
// ones need 66-68 unbounded, and at one CTA per SM 4096x14336 g128 at M = 1 took 15.3 us; 12.3-12.7 at two).
// Per channel with staged activations, the 8-tile ones too: a wave of them fills the SMs once, and the second CTA
// slot of each SM then takes the next call's CTA (programmatic dependent launch), which streams its weights beside
// this call's dependency wait and tail instead of after them (H200, 4096x4096 per channel, GEMMs in a row: M = 16
// 4.69-4.73 -> 3.94-4.10 us, M = 8 4.58-4.62 -> 3.72-3.85). Grouped, the ring and its s2 / z2 words do not fit 64
// registers: ptxas spills ring slots right after their loads, and a spill store waits for the load's data, which
// stalls the thread until its weights land (11.6-12.7 us); those stay at one CTA per SM.
template <int MT, int kGT, int kWarps, int kU>
__host__ __device__ constexpr int min_ctas() {
  return kWarps == 16 && (kU == 4 || (MT == 2 && kGT == 0 && kU == 8)) ? 2 : 1;
}

template <int MT, int kGT, int kWarps, int kU, int kRows, int kC>
__global__ void __launch_bounds__(kWarps * 32, min_ctas<MT, kGT, kWarps, kU>()) gemv_kernel(const GemmArgs p) {
#if defined(DCC_GEMV_DEVICE)
  static_assert(kWarps % kRows == 0, "warps per row tile");
  static_assert(kC == 1 || MT > 1, "activations are shared across the cluster only where they are staged");
  constexpr int kWK = kWarps / kRows;
  constexpr bool kGrouped = kGT > 0;
  constexpr int kG = kGrouped ? kGT : 1;   // consecutive k tiles a warp takes (per channel: 1)
  static_assert(kU % kG == 0, "a ring round holds whole groups");
  constexpr bool kStage = MT > 1;   // activations through shared memory
  // The launch's thread count as a compile-time constant rather than blockDim.x (read at run time): as the output
  // loop's stride, after the last activation rows land (on the critical path), it saved ~0.13 us per call
  // (4096x4096, M = 16, H200).
  constexpr int kThreads = kWarps * 32;
  extern __shared__ __align__(16) uint8_t xs[];
  __shared__ __align__(16) Smem<MT, kWarps, kRows> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kw = warp / kRows;
  const int split = blockIdx.x, nt = blockIdx.y * kRows + warp % kRows;
  // S is a power of two (gemm_gemv.cu): shifts, not divisions. A runtime division is a chain of ~20 dependent
  // instructions, and every warp runs it before its first load (here) and before its outputs (below).
  const int ktiles = p.K / 32, lg_s = __ffs(p.S) - 1;
  const int units = ktiles / kG;   // k tiles, or groups
  const int kb = ((split * units) >> lg_s) * kG, ke = (((split + 1) * units) >> lg_s) * kG;
  // tiles of this warp: kb + kG*kw + rel(i), i < cnt (a multiple of kG)
  int cnt = ((ke - kb) / kG - kw + kWK - 1) / kWK * kG;
  auto rel = [](int i) {   // kG a power of two, i >= 0: shifts and masks
    const unsigned v = i;
    return static_cast<int>((v / kG) * kG * kWK + v % kG);
  };

  // Weights first (they do not depend on the previous kernel in the stream): kU loads per lane in flight.
  const uint8_t* wptr = p.qweight + (static_cast<size_t>(nt) * ktiles + kb + kG * kw) * 512 + lane * 16;
  const uint8_t* s2s = p.s2s + nt * 32 + g * 4;
  const uint8_t* s2z = p.s2z + nt * 32 + g * 4;
  Slot<kGrouped> ring[kU];
  // Slot u of the ring always holds a tile i with i % kU == u, so i % kG == u % kG: the slots that start a group
  // (u % kG == 0, a compile-time fact in the unrolled loops) carry its s2 / z2 words, the others none.
  auto load = [&](Slot<kGrouped>& s, int i, int u) {
    s.w = ldg_stream(wptr + static_cast<size_t>(rel(i)) * 512);
    if constexpr (kGrouped) {
      if (u % kG == 0) {
        const size_t off = static_cast<size_t>(static_cast<unsigned>(kb + kG * kw + rel(i)) / kG) * p.N;
        s.s2 = ldg_u32(s2s + off);
        s.z2 = ldg_u32(s2z + off);
      }
    }
  };
  // MT = 1: token g's activation words of tile i (k 4t.. and 16+4t..), zero past M
  const int8_t* xrow =
      !kStage && g < p.M ? p.xq + static_cast<size_t>(g) * p.K + (kb + kG * kw) * 32 + 4 * t : nullptr;
  auto load_x = [&](Slot<kGrouped>& s, int i) {
    if (xrow) {
      const int8_t* q = xrow + static_cast<size_t>(rel(i)) * 32;
      s.b0 = ldg_u32(q);
      s.b1 = ldg_u32(q + 16);
    } else {
      s.b0 = s.b1 = 0;
    }
  };
#pragma unroll
  for (int u = 0; u < kU; ++u)
    if (u < cnt) load(ring[u], u, u);

  const int n0 = blockIdx.y * kRows * 32;
  for (int i = threadIdx.x; i < kRows * 8 * MT * kRedStride; i += kThreads) sm.red[i] = 0;   // (barrier below)
  const bool pre = scales_aligned<kGrouped>(p);
  if (pre) {   // channel scales: kRows * 4 chunks of 16 bytes per array (threads 0.., and 32.. for szeros)
    const int c = threadIdx.x % 32, arr = threadIdx.x / 32;
    if (c < kRows * 4 && arr < (kGrouped ? 1 : 2))
      cp_async16(&sm.sc[arr][c * 8], (arr ? p.szeros : p.s1) + n0 + c * 8, true);
  }

  // Activation slice: one bulk copy per token row, issued by thread 0 once the previous kernel (which writes the
  // activations; programmatic dependent launch) has completed. With kC > 1 the kC CTAs of the cluster that share
  // this K range (cluster ranks split + S*c) share the copies: CTA c issues rows c, c + kC, .. multicast to all kC,
  // so L2 serves each row once per cluster, not once per CTA (all CTAs read the same rows at the same moment, and
  // that traffic, not the weights, set the time at M = 16). Their mbarriers must be initialised before a peer's
  // copy lands: hence the cluster barrier. Its arrive is relaxed: a release arrive waits for this thread's loads in
  // flight, the whole weight ring (2 us at 4096x4096, M = 16), and the activations were then requested only once
  // the weights had landed. Relaxed, each CTA finishes 1 us earlier; GEMMs in a row are no faster (the weight
  // stream and the activation reads share L2; H200: 5.43-5.62 against 5.46-5.51 us), but activation quantization
  // + GEMM is (8.19 -> 7.65 us).
  const int stride = slice_stride(ke - kb);
  const uint32_t xbar0 = smem_u32(&sm.xbar[0]), xbar1 = smem_u32(&sm.xbar[1]), xs0 = smem_u32(xs);
  if (threadIdx.x == 0) {
    sm90::mbar_init(xbar0, 1);
    sm90::mbar_init(xbar1, 1);
    sm90::fence_barrier_init();
  }
  if constexpr (kC > 1) {
    __syncthreads();   // the zeroed sums (the relaxed cluster barrier orders nothing)
    sm90::cluster_sync_relaxed();
  } else {
    __syncthreads();
    // split-K pushes into the peers' shared memory at the end: this phase, waited for just before, guarantees
    // that they have all started
    if (p.S > 1) sm90::cluster_arrive_relaxed();
  }
  sm90::grid_launch_dependents();
  sm90::grid_dependency_wait();   // before the activations, token scales and our outputs (the last kernel's data)
  if (pre && threadIdx.x >= 64 && threadIdx.x < (kGrouped ? 66 : 68)) {   // token scales (64, 65), sums (66, 67)
    const int c = (threadIdx.x - 64) % 2, arr = (threadIdx.x - 64) / 2;
    const int valid = min(max(p.M - 8 * c, 0), 8);   // tokens of this chunk below M
    cp_async_n(&sm.tk[arr][c * 8], (arr ? p.asum : p.ascale) + 8 * c, 2 * valid);
  }
  cp_async_commit();
  if (kStage && threadIdx.x == 0) {
    const uint32_t bytes = (ke - kb) * 32;
    // every CTA receives all M rows: rows 0-7 complete xbar0, rows 8.. xbar1 (at M <= 8 an arrive without bytes)
    sm90::mbar_arrive_expect_tx(xbar0, bytes * min(p.M, 8));
    sm90::mbar_arrive_expect_tx(xbar1, bytes * max(p.M - 8, 0));
    const int8_t* src = p.xq + kb * 32;
    if constexpr (kC == 1 || !sm90::kMulticast) {
      for (int m = 0; m < p.M; ++m)
        sm90::bulk_load(xs0 + m * stride, src + static_cast<size_t>(m) * p.K, bytes, m < 8 ? xbar0 : xbar1);
    } else {
      uint16_t mask = 0;
      for (int c = 0; c < kC; ++c) mask |= static_cast<uint16_t>(1u << (split + p.S * c));
      for (int m = blockIdx.y % kC; m < p.M; m += kC)
        sm90::bulk_load_multicast(xs0 + m * stride, src + static_cast<size_t>(m) * p.K, bytes, m < 8 ? xbar0 : xbar1,
                                  mask);
    }
  }
  // MT = 2: one ldmatrix.x4 per tile gives the lane its four B fragment words (token 8j + g, k 4t.. and 16 + 4t..
  // for j = 0, 1): lanes 0-7 / 8-15 / 16-23 / 24-31 address the rows of tokens 0-7 (k bytes 0-15 / 16-31) and
  // tokens 8-15 (0-15 / 16-31). Rows past M point at row M - 1: their sums are garbage and never written.
  const int xtok = min(8 * (lane / 16) + lane % 8, p.M - 1);
  const uint32_t xaddr = xs0 + xtok * stride + kG * kw * 32 + 16 * ((lane / 8) % 2);

  int acc[2][MT][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[s][j][i] = 0;

  if constexpr (kStage) {
    if (kU == 8 && min_ctas<MT, kGT, kWarps, kU>() == 1 && cnt <= kU) {
      // Every weight tile of the warp is in registers (one round): unpack them while the activation slice is in
      // flight (the weights land first: the slice is requested after them), then do the mma work of tokens 0-7 as
      // soon as their rows have landed and that of tokens 8-15 after. The unpacked tiles take 64 registers: the
      // shapes that come here run one CTA per SM anyway, while those that run two keep to 64 registers by
      // unpacking in the loop (below). B fragments (ldmatrix .x2: one token half) are read one tile ahead of
      // their mma; ldmatrix and mma are asm volatile, so their order is the order written here.
      uint32_t a[kU][2][4];
      Level2 l2;   // of the group of tile u (set at its first tile)
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (u < cnt) {
          if constexpr (kGrouped) {
            if (u % kG == 0) l2 = level2(ring[u].s2, ring[u].z2);
          }
          unpack_tile<kGrouped>(ring[u].w, l2, a[u][0], a[u][1]);
        }
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        sm90::mbar_wait(j ? xbar1 : xbar0, 0);
        // lanes 0-15 address tokens 8j + lane % 8 (k bytes 0-15 / 16-31); past M: row M - 1 (never written)
        const uint32_t xa = xs0 + min(8 * j + lane % 8, p.M - 1) * stride + kG * kw * 32 + 16 * ((lane / 8) % 2);
        uint32_t b[2][2];
        if (cnt > 0) sm90::ldsm_x2(b[0], xa);   // (a warp without tiles must not read past its row)
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (u < cnt) {
            if (u + 1 < kU && u + 1 < cnt) sm90::ldsm_x2(b[(u + 1) % 2], xa + rel(u + 1) * 32);
            mma_s8(acc[0][j], a[u][0], b[u % 2][0], b[u % 2][1]);
            mma_s8(acc[1][j], a[u][1], b[u % 2][0], b[u % 2][1]);
          }
      }
      cnt = 0;   // done: nothing left for the loop below
    } else {
      sm90::mbar_wait(xbar0, 0);
      sm90::mbar_wait(xbar1, 0);
      // One round, per channel: unpacking in the loop, each tile's B fragments read right before its mma (read
      // one tile ahead, as above, their 4 more registers made ptxas spill in the 64 of two CTAs per SM, and the
      // 8-tile shapes took 4.35-4.72 us instead of 3.94-4.10 at 4096x4096, M = 16). This is the loop below without
      // its refills; folding it into that loop is untried at 64 registers, where the refill code's registers
      // decide whether ptxas spills a just-loaded slot (a spill store of a slot waits for its load: DESIGN.md,
      // variants dropped). With groups the loop below (the level-2 words take registers: 4-tile shapes would pass
      // 64).
      if (!kGrouped && cnt <= kU) {
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (u < cnt) {
            uint32_t lo[4], hi[4], b[4];
            sm90::ldsm_x4(b, xaddr + rel(u) * 32);
            unpack_tile<false>(ring[u].w, Level2{}, lo, hi);
#pragma unroll
            for (int j = 0; j < MT; ++j) {
              mma_s8(acc[0][j], lo, b[2 * j], b[2 * j + 1]);
              mma_s8(acc[1][j], hi, b[2 * j], b[2 * j + 1]);
            }
          }
        cnt = 0;   // done: nothing left for the loop below
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kU; ++u)
      if (u < cnt) load_x(ring[u], u);
  }
  Level2 l2;   // of the current group (set at its first tile, before that slot is refilled)
  for (int i0 = 0; i0 < cnt; i0 += kU) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int i = i0 + u;
      if (i < cnt) {
        const Slot<kGrouped> cur = ring[u];
        if (i + kU < cnt) {   // refill the slot just taken
          load(ring[u], i + kU, u);
          if constexpr (!kStage) load_x(ring[u], i + kU);
        }
        if constexpr (kGrouped) {
          if (u % kG == 0) l2 = level2(cur.s2, cur.z2);
        }
        uint32_t lo[4], hi[4];
        unpack_tile<kGrouped>(cur.w, l2, lo, hi);
        uint32_t b[4] = {cur.b0, cur.b1, 0u, 0u};
        if constexpr (kStage) sm90::ldsm_x4(b, xaddr + rel(i) * 32);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
          mma_s8(acc[0][j], lo, b[2 * j], b[2 * j + 1]);
          mma_s8(acc[1][j], hi, b[2 * j], b[2 * j + 1]);
        }
      }
    }
  }
  // The warps' sums, added into red[row tile][token][row] (c0/c1: row g, tokens 2t, 2t+1; c2/c3: row g+8; slab s:
  // rows 16s..): shared-memory atomics (integer: the same bits in any order), one 4-byte add per sum, where storing
  // every warp's sums and reading 16 of them per output moved twice the bytes (4096x4096, M = 16, H200: 5.00 ->
  // 4.85 us).
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * s + g + 8 * (i / 2), tok = 8 * j + 2 * t + (i % 2);
        atomicAdd(&sm.red[((warp % kRows) * 8 * MT + tok) * kRedStride + row], acc[s][j][i]);
      }
  cp_async_wait<0>();   // this thread's scale copies; the barrier publishes everyone's
  __syncthreads();
  // Output e of the CTA: pair pr = e / 32 (row tile rt = pr / toks, token pr % toks), row e % 32; the pair's
  // (rt, tok) come from a subtraction loop and everything else from shifts (S is a power of two): the divisions by
  // M and S this replaces were chains of dependent instructions that every warp ran before its first output (0.5 us
  // of the 4096x4096 kernel's 4.6). Split-K over the cluster: the CTA of split r writes rows [r*32/S, (r+1)*32/S) of
  // every pair; the others push their sums of those into its part region (st.shared::cluster) before one cluster
  // barrier, and it adds them from its own shared memory (integer: the same bits in any order). Nothing is read
  // across CTAs after the barrier, so no second one. The CTA of split z is cluster rank z + S*c, c its row block in
  // the cluster.
  const int toks = p.M, E = kRows * toks * 32;
  const int lg_r = 5 - lg_s, Es = E >> lg_s;   // rows per split (32/S, S <= 8) and outputs per split
  const int rank0 = p.S * (blockIdx.y % kC);
  auto pair = [&](int pr, int& rt, int& tok) {
    rt = 0;
    tok = pr;
#pragma unroll
    for (int r = 1; r < kRows; ++r)
      if (tok >= toks) {
        tok -= toks;
        ++rt;
      }
  };
  auto out_val = [&](int v, int rt, int tok, int row) {
    const int c = rt * 32 + row;
    if (!pre) return epilogue(v, tok, n0 + c, p);
    return epilogue_fast(v, sm.sc[0][c], sm.sc[1][c], sm.tk[0][tok], sm.tk[1][tok], !kGrouped);
  };
  if (p.S == 1 && pre) {
    // The common case as straight code: no split-K or global-scale branches between the barrier and the stores.
    // All of it follows the last activation rows, so each instruction delays the grid's end and, through the next
    // kernel's dependency wait, the next call (4096x4096, M = 16, H200, with kThreads: 4.78 -> 4.60 us). Leaving
    // without a cluster barrier: as below (S == 1).
    for (int e = threadIdx.x; e < E; e += kThreads) {
      const int pr = e >> 5, row = e & 31;
      int rt, tok;
      pair(pr, rt, tok);
      const int c = rt * 32 + row;
      const int v = sm.red[(rt * 8 * MT + tok) * kRedStride + row];
      p.out[static_cast<size_t>(tok) * p.N + n0 + c] =
          epilogue_fast(v, sm.sc[0][c], sm.sc[1][c], sm.tk[0][tok], sm.tk[1][tok], !kGrouped);
    }
    return;
  }
  if (kC == 1 && p.S > 1) sm90::cluster_wait();   // every peer runs (the arrive at the start)
  const uint32_t part0 = smem_u32(sm.part);
  for (int e = threadIdx.x; e < E; e += kThreads) {
    const int pr = e >> 5, row = e & 31;
    int rt, tok;
    pair(pr, rt, tok);
    const int v = sm.red[(rt * 8 * MT + tok) * kRedStride + row];
    if (p.S == 1) {
      p.out[static_cast<size_t>(tok) * p.N + n0 + rt * 32 + row] = out_val(v, rt, tok, row);
    } else {
      const int owner = row >> lg_r, slot = split * Es + (pr << lg_r) + (row & ((1 << lg_r) - 1));
      if (owner == split) sm.part[slot] = v;
      else sm90::st_cluster32(sm90::mapa(part0 + 4 * slot, rank0 + owner), v);
    }
  }
  // Leaving without a cluster barrier is safe with kC > 1 too: every multicast copy into this CTA's shared memory
  // landed before its first mma (it waited for all M rows), and nothing else is read across CTAs when S == 1.
  if (p.S == 1) return;
  sm90::cluster_sync_all();   // release: our pushes have landed; acquire: the peers' are visible
  for (int i = threadIdx.x; i < Es; i += kThreads) {
    int v = 0;
    for (int z = 0; z < p.S; ++z) v += sm.part[z * Es + i];
    const int row = (split << lg_r) + (i & ((1 << lg_r) - 1));
    int rt, tok;
    pair(i >> lg_r, rt, tok);
    p.out[static_cast<size_t>(tok) * p.N + n0 + rt * 32 + row] = out_val(v, rt, tok, row);
  }
#endif
}

}  // namespace gemv
}  // namespace dcc_w4a8
