// Device side of the Hopper W4A8 GEMM (included by gemm_wgmma.cu only, inside namespace dcc_w4a8 and its anonymous
// namespace; the design is described at the top of gemm_wgmma.cu). One kernel template, three tile configurations
// of 256 channels: WgCfg<128, 4> (128 tokens, 4 stages: large M), WgCfg<64, 6> (64 tokens, 6 stages: medium M, twice
// the CTAs per layer) and WgCfg<16, 8> (16 tokens, 8 stages: M <= 16, where the kernel streams weights and the wgmma
// N of 16 wastes tensor work nobody waits for).
#pragma once

#include <type_traits>

#include "wgmma_cfg.cuh"

#if defined(DCC_WGMMA_DEVICE)
using namespace wgk;
#include "wgmma_epilogue.cuh"
#endif

// kMode (WgMode): how the CTAs share tiles and k stages. Separate instantiations keep each variant's registers and
// code to what it runs.
template <int kGroup, class C, int kMode>
__global__ void __launch_bounds__(kThreads, 1) w4a8_wgmma_kernel(const __grid_constant__ CUtensorMap tmap,
                                                                 const WgParams p) {
#if defined(DCC_WGMMA_DEVICE)
  constexpr int kTok = C::kTok, kStages = C::kStages, kTileN = C::kTileN, kTileK = C::kTileK;
  constexpr int kActBytes = C::kActBytes, kWBytes = C::kWBytes, kStageBytes = C::kStageBytes;
  constexpr int kWGroup = C::kWGroup, kS2Off = C::kS2Off;
  static_assert(kWGroup == 1 || kTok <= 16, "weight groups are read by the few-token stage loop only");
  constexpr int kEpiStride = C::kEpiStride, kAcc = kTok / 2;   // accumulators per thread per nibble slab
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stages = smem;
  uint8_t* wregion = smem + kStages * kStageBytes;   // kWGroup > 1: [8 blocks][kStages][2 KB]
  uint8_t* after = wregion + C::kWRegionBytes;
  __half* epi = reinterpret_cast<__half*>(after);
  double* scl = reinterpret_cast<double*>(after + C::kEpiBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(after + C::kEpiBytes + C::kScaleBytes);
  const uint32_t full0 = smem_addr(bars), empty0 = smem_addr(bars + kStages);
  const uint32_t recv0 = smem_addr(after + C::kEpiBytes + C::kScaleBytes + C::kBarBytes);   // 16-byte aligned

  const int num_tiles = p.num_m_tiles * (p.N / kTileN);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);   // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  // few-token split: the peers' shared memory is written (pushed) later; this barrier phase, waited for just before
  // that, guarantees that they have all started
  if constexpr (kMode == kCluster && kTok <= 16) cluster_arrive_relaxed();
  // Let the next kernel in the stream launch (programmatic dependent launch) once every CTA of this grid runs: its
  // CTAs take SMs as this grid's CTAs leave and prefetch what does not depend on this grid's outputs.
  grid_launch_dependents();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= 8) {
    // ---------------- producer: one thread streams every segment's stages through the ring ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      constexpr int gps = kGroup == 0 ? 0 : kTileK / kGroup;   // groups per stage
      constexpr uint32_t bytes = kActBytes + gps * 2 * kTileN;   // per stage, weights apart
      const size_t kblocks = static_cast<size_t>(p.K / 32);
      // s2 rows (and, at the first stage of a weight group, the weights of its `len` stages) of k stage kt of the
      // 256 channels from n0 into ring slot s (stage buffer st): bytes + kWBytes * len in all.
      auto load_weights = [&](uint32_t st, int s, int kt, int len, int n0, uint32_t full) {
        const uint32_t wdst = kWGroup == 1 ? st + kActBytes : smem_addr(wregion) + s * 2048;
        constexpr uint32_t wstride = kWGroup == 1 ? 2048 : kStages * 2048;   // between 32-channel blocks
        if (len > 0) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const uint8_t* src = p.qweight + ((static_cast<size_t>(n0 / 32 + i) * kblocks) + kt * 4) * 512;
            bulk_load(wdst + i * wstride, src, 2048 * len, full);
          }
        }
#pragma unroll
        for (int gi = 0; gi < gps; ++gi) {
          const size_t row = static_cast<size_t>(kt * kTileK / (kGroup > 0 ? kGroup : 1) + gi) * p.N + n0;
          bulk_load(st + kS2Off + gi * 512, p.s2s + row, kTileN, full);
          bulk_load(st + kS2Off + gi * 512 + 256, p.s2z + row, kTileN, full);
        }
      };
      // Stages whose weights the copy issued at stage `it` (ring slot s) of a segment of KT stages brings: a group
      // starts at a segment's first stage and at every kWGroup-aligned slot, and stops at the segment's end and at
      // the next aligned slot (so its slots are contiguous and never wrap); 0 inside a group.
      auto group_len = [&](int it, int s, int KT) -> int {
        if (kWGroup == 1) return 1;
        if (it > 0 && s % kWGroup != 0) return 0;
        const int to_slot = kWGroup - s % kWGroup, to_end = KT - it;
        return to_slot < to_end ? to_slot : to_end;
      };
      // Programmatic dependent launch: the weights do not depend on the kernel before this one, so the first ring
      // (across segments) is requested before waiting for it; the activations (its output) only after.
      int pre = 0;
      for (Segments sg(p, num_tiles); sg.valid() && pre < kStages; sg.next()) {
        const int n0 = (sg.tile / p.num_m_tiles) * kTileN;
        for (int it = 0; it < sg.len && pre < kStages; ++it, ++pre) {   // fresh ring: every stage is free
          // expect_tx before the copies: the TMA box counts in full, rows past M included
          const int len = group_len(it, pre, sg.len);
          mbar_arrive_expect_tx(full0 + 8 * pre, bytes + kWBytes * len);
          load_weights(smem_addr(stages + pre * kStageBytes), pre, sg.kb + it, len, n0, full0 + 8 * pre);
        }
      }
      grid_dependency_wait();
      {
        int g_it = 0;
        for (Segments sg(p, num_tiles); sg.valid() && g_it < pre; sg.next()) {
          const int m0 = (sg.tile % p.num_m_tiles) * kTok;
          for (int it = 0; it < sg.len && g_it < pre; ++it, ++g_it)
            tma_load_2d(smem_addr(stages + g_it * kStageBytes), &tmap, (sg.kb + it) * kTileK, m0, full0 + 8 * g_it);
        }
      }
      int g_it = 0;
      for (Segments sg(p, num_tiles); sg.valid(); sg.next()) {
        const int m0 = (sg.tile % p.num_m_tiles) * kTok, n0 = (sg.tile / p.num_m_tiles) * kTileN;
        for (int it = 0; it < sg.len; ++it, ++g_it) {
          if (g_it < pre) continue;
          const int s = g_it % kStages;
          const uint32_t parity = ((g_it / kStages) & 1) ^ 1;
          mbar_wait(empty0 + 8 * s, parity);
          const int len = group_len(it, s, sg.len);
          // a group's copy fills slots s .. s+len-1 (same ring round): the consumers release slots in order
          if (len > 1) mbar_wait(empty0 + 8 * (s + len - 1), parity);
          const uint32_t full = full0 + 8 * s;
          mbar_arrive_expect_tx(full, bytes + kWBytes * len);
          const uint32_t st = smem_addr(stages + s * kStageBytes);
          tma_load_2d(st, &tmap, (sg.kb + it) * kTileK, m0, full);
          load_weights(st, s, sg.kb + it, len, n0, full);
        }
      }
    }
    if constexpr (kMode == kCluster) {   // the consumers' cluster barriers (every thread of the cluster takes part)
      if constexpr (kTok <= 16) cluster_wait();
      cluster_sync_all();
      if constexpr (kTok > 16) cluster_sync_all();
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  grid_dependency_wait();   // before reading the token scales or writing outputs (the previous kernel's data)
  const int wg = warp / 4, wq = warp % 4;
  const int g = lane / 4, t = lane % 4;
  const int tid = threadIdx.x % 128;
  const int bar_id = 1 + wg;
  const uint32_t stage0 = smem_addr(stages);
  // the warp's 2 KB of weights of ring slot s: stage0 + s * kStageBytes + w_off (kWGroup == 1) or
  // wreg + s * 2048 (weight groups; a consumer that waited for slot s has waited for its group's first slot)
  const uint32_t w_off = kActBytes + (wg * 4 + wq) * 2048 + lane * 16;
  const uint32_t wreg = smem_addr(wregion) + (wg * 4 + wq) * (kStages * 2048) + lane * 16;
  const uint32_t s2_off = kS2Off + (wg * 128 + wq * 32 + 4 * g);
  // channels of this thread within the warpgroup's 128: lo rows g, g+8 -> 32wq + g (+8); hi -> 32wq + 16 + g (+8)
  const int cbase = 32 * wq + g;
  // token scale / sum as float (the first 4 * kTok doubles of scl are no longer used: the layout is kept)
  float* asf = reinterpret_cast<float*>(scl + 4 * kTok) + wg * 2 * kTok;
  float* amf = asf + kTok;
  __half* T = epi + wg * kTok * kEpiStride;
  int g_it = 0;

  for (Segments sg(p, num_tiles); sg.valid(); sg.next()) {
    const int tile = sg.tile, KT = sg.len;
    const int m0 = (tile % p.num_m_tiles) * kTok, n0 = (tile / p.num_m_tiles) * kTileN;
    const int nbase = n0 + wg * 128;
    int acc_lo[kAcc], acc_hi[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc_lo[i] = acc_hi[i] = 0;
    // Few tokens: this thread's channel scales (rows cbase + 8rp + 16h, index rp + 2h) and token scales and sums
    // (tokens m0 + 8i + 2t + e, index 2i + e) are requested before the k loop, so that their DRAM latency overlaps
    // the weight stream instead of following it (the consumers passed the dependency wait: the token scales are
    // the previous kernel's output).
    __half s1h[4], szh[4], ash[pre_toks(kTok)], amh[pre_toks(kTok)];
    if constexpr (kTok <= 16) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int c = nbase + cbase + 8 * (q & 1) + 16 * (q >> 1);
        s1h[q] = ldg_h(p.s1 + c);
        szh[q] = kGroup == 0 ? ldg_h(p.szeros + c) : __half();
      }
#pragma unroll
      for (int j = 0; j < kTok / 4; ++j) {
        const int m = m0 + 8 * (j / 2) + 2 * t + j % 2;
        ash[j] = m < p.M ? ld_h(p.ascale + m) : __half();
        amh[j] = kGroup == 0 && m < p.M ? ld_h(p.asum + m) : __half();
      }
    }

    if constexpr (kTok <= 16) {
      // Few tokens: a wgmma is short and the kernel streams weights. Per stage, unpack the whole stage (4 k32 steps
      // x 2 slabs = 32 registers) and issue its 8 wgmmas as one group; the groups are double-buffered (two register
      // sets, the k loop unrolled by two so that the set index is a constant): wait_group 1 retires the previous
      // stage's group while this one runs, so a stage's smem reads and unpacking overlap the previous stage's
      // wgmmas instead of following them (H200: 0.5-1.5% on the large layers; a stage takes ~0.3 us of consumer
      // time, below the ~0.4 us at which its weights arrive once the first ring is used up).
      uint32_t fr[2][2][4][4];   // [register set][lo / hi slab][k32 step][4]
      auto stage = [&](auto set_c, int it) {
        constexpr int set = decltype(set_c)::value;
        const int s = g_it % kStages;
        mbar_wait(full0 + 8 * s, (g_it / kStages) & 1);
        const uint32_t st = stage0 + s * kStageBytes;
        [[maybe_unused]] uint32_t s2w[2] = {0, 0}, z2w[2] = {0, 0};
        if constexpr (kGroup > 0) {
#pragma unroll
          for (int gi = 0; gi < kTileK / kGroup; ++gi) {
            s2w[gi] = lds32(st + s2_off + gi * 512);
            z2w[gi] = lds32(st + s2_off + gi * 512 + 256);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t wa = kWGroup == 1 ? st + w_off : wreg + s * 2048;
          if constexpr (kGroup == 0) {
            // Per channel: the low nibbles (0..15) and the whole bytes (lo + 16 hi, 0..255) as u8 A operands: one
            // AND per register instead of a shift and two ANDs. The same warps issue the ALU work and the wgmmas,
            // and it does not overlap them (H200 microbenchmark: a stage's 16 wgmmas take 210 cycles alone, 350
            // with the three-operation unpack); 14336x4096 M = 16: 11.5 -> 10.85 us, 4096x14336 12.3 -> 11.7.
            // acc_hi collects lo + 16 hi; the high-nibble sums are (acc_hi - acc_lo) / 16 after the k loop.
            const uint4 w = lds128(wa + j * 512);
            fr[set][1][j][0] = w.x; fr[set][1][j][1] = w.y; fr[set][1][j][2] = w.z; fr[set][1][j][3] = w.w;
            fr[set][0][j][0] = w.x & 0x0F0F0F0Fu; fr[set][0][j][1] = w.y & 0x0F0F0F0Fu;
            fr[set][0][j][2] = w.z & 0x0F0F0F0Fu; fr[set][0][j][3] = w.w & 0x0F0F0F0Fu;
          } else {
            const int gi = (j * 32) / (kGroup > 0 ? kGroup : 128);
            unpack<kGroup>(lds128(wa + j * 512), s2w[gi], z2w[gi], fr[set][0][j], fr[set][1][j]);
          }
        }
        const uint64_t desc = desc_sw128(st);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if constexpr (kGroup == 0) {
            wgmma_m64n16k32_u8s8(acc_lo, fr[set][0][j], desc + (j * 32 >> 4));
            wgmma_m64n16k32_u8s8(acc_hi, fr[set][1][j], desc + (j * 32 >> 4));
          } else {
            wgmma_s8<kTok>(acc_lo, fr[set][0][j], desc + (j * 32 >> 4));
            wgmma_s8<kTok>(acc_hi, fr[set][1][j], desc + (j * 32 >> 4));
          }
        }
        wgmma_commit();
        wgmma_wait<1>();   // the previous stage's group retired: its register set and its ring slot are free
        if (it > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));
        ++g_it;
      };
      int it = 0;
      for (; it + 1 < KT; it += 2) {
        stage(std::integral_constant<int, 0>(), it);
        stage(std::integral_constant<int, 1>(), it + 1);
      }
      if (it < KT) stage(std::integral_constant<int, 0>(), it);
      wgmma_wait<0>();
      if (lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));   // the segment's last stage
      if constexpr (kGroup == 0) {
        // acc_hi = S_lo + 16 S_hi never overflows (|acc_hi| <= 255 * 128 * K < 2^31: the host refuses per-channel
        // K > 65536 at M <= 16), so acc_hi - acc_lo is exactly 16 S_hi and the arithmetic shift divides it exactly.
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc_hi[i] = (acc_hi[i] - acc_lo[i]) >> 4;
      }
    } else {
      for (int it = 0; it < KT; ++it, ++g_it) {
        const int s = g_it % kStages;
        mbar_wait(full0 + 8 * s, (g_it / kStages) & 1);
        const uint32_t st = stage0 + s * kStageBytes;
        const uint64_t desc = desc_sw128(st);
        uint32_t s2w[2] = {0, 0}, z2w[2] = {0, 0};
        if constexpr (kGroup > 0) {
#pragma unroll
          for (int gi = 0; gi < kTileK / kGroup; ++gi) {
            s2w[gi] = lds32(st + s2_off + gi * 512);
            z2w[gi] = lds32(st + s2_off + gi * 512 + 256);
          }
        }
        // Software pipeline over the stage's four k32 steps: the next step's weights are loaded and unpacked while
        // this step's wgmmas run; wait_group 1 then retires the previous step (its A registers become free).
        uint32_t lo[4], hi[4];
        unpack<kGroup>(lds128(st + w_off), s2w[0], z2w[0], lo, hi);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wgmma_fence();
          wgmma_s8<kTok>(acc_lo, lo, desc + (j * 32 >> 4));
          wgmma_s8<kTok>(acc_hi, hi, desc + (j * 32 >> 4));
          wgmma_commit();
          if (j < 3) {
            const int gi = kGroup > 0 ? ((j + 1) * 32) / (kGroup > 0 ? kGroup : 128) : 0;
            unpack<kGroup>(lds128(st + w_off + (j + 1) * 512), s2w[gi], z2w[gi], lo, hi);
          }
          wgmma_wait<1>();
          if (j == 0 && it > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));
        }
      }
      wgmma_wait<0>();
      if (lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));   // the tile's last stage
    }

    if constexpr (kMode == kCluster) {
      // Split-K over the S CTAs of a cluster (grid.y; one tile per CTA in this mode): CTA rank r writes the outputs
      // of consumer warps [8r/S, 8(r+1)/S) (its "own" warps), summing the S CTAs' int32 partials of those warps
      // (integer: exact in any order).
      constexpr int kV = kAcc / 4;   // int4 per thread per nibble slab
      auto add = [&](const int4& a, const int4& b, int v) {
        acc_lo[4 * v] += a.x; acc_lo[4 * v + 1] += a.y; acc_lo[4 * v + 2] += a.z; acc_lo[4 * v + 3] += a.w;
        acc_hi[4 * v] += b.x; acc_hi[4 * v + 1] += b.y; acc_hi[4 * v + 2] += b.z; acc_hi[4 * v + 3] += b.w;
      };
      const int S = p.S, rank = static_cast<int>(cluster_rank()), owner = warp * S / 8;
      if constexpr (kTok <= 16) {
        // Few tokens (push): a warp that another CTA owns stores its partials straight into that CTA's receive
        // region (st.shared::cluster; slot [sender][owned warp][v][lane], 2 KB each), one cluster barrier
        // (release / acquire) publishes them, and the owner adds them from its own shared memory to the partials
        // still in its registers. One barrier and no remote loads: the pull version (stores to its own shared
        // memory, a barrier, remote loads, a second barrier) spent ~1.3 us after the k loop (H200 trace,
        // DESIGN.md).
        const int own_max = (8 + S - 1) / S;   // warps per owner, at most
        cluster_wait();   // every CTA of the cluster has started (the arrive at the kernel's start)
        if (owner != rank) {
          const int w0 = (8 * owner + S - 1) / S, j = rank < owner ? rank : rank - 1;
          const uint32_t dst = mapa(recv0, owner) + ((j * own_max + warp - w0) * 2 * kV * 32 + lane) * 16;
#pragma unroll
          for (int v = 0; v < kV; ++v) {
            st_cluster128(dst + v * 512, make_int4(acc_lo[4 * v], acc_lo[4 * v + 1], acc_lo[4 * v + 2],
                                                   acc_lo[4 * v + 3]));
            st_cluster128(dst + (kV + v) * 512, make_int4(acc_hi[4 * v], acc_hi[4 * v + 1], acc_hi[4 * v + 2],
                                                          acc_hi[4 * v + 3]));
          }
        }
        cluster_sync_all();
        if (owner == rank) {
          const int w0 = (8 * rank + S - 1) / S;
          for (int j = 0; j < S - 1; ++j) {
            const uint32_t src = recv0 + ((j * own_max + warp - w0) * 2 * kV * 32 + lane) * 16;
#pragma unroll
            for (int v = 0; v < kV; ++v) {
              const uint4 a = lds128(src + v * 512), b = lds128(src + (kV + v) * 512);
              add(make_int4(a.x, a.y, a.z, a.w), make_int4(b.x, b.y, b.z, b.w), v);
            }
          }
          epilogue_direct<kGroup, kTok>(acc_lo, acc_hi, p, m0, nbase + cbase, t, s1h, szh, ash, amh);
        }
      } else {
        // Larger tiles (pull): each CTA stores its partials in its own shared memory (the stage ring: every stage
        // was consumed and its wgmmas retired, once both consumer warpgroups are done with it), a cluster barrier
        // publishes them, the owners read all S over distributed shared memory, and a second barrier keeps every
        // CTA's shared memory alive until the remote reads are done.
        const int ctid = threadIdx.x;   // 0..255
        named_bar_sync(3, 256);
#pragma unroll
        for (int v = 0; v < kV; ++v) {
          sts128(stage0 + (v * 256 + ctid) * 16, make_int4(acc_lo[4 * v], acc_lo[4 * v + 1], acc_lo[4 * v + 2],
                                                           acc_lo[4 * v + 3]));
          sts128(stage0 + ((kV + v) * 256 + ctid) * 16, make_int4(acc_hi[4 * v], acc_hi[4 * v + 1],
                                                                  acc_hi[4 * v + 2], acc_hi[4 * v + 3]));
        }
        cluster_sync_all();
        if (owner == rank) {
#pragma unroll
          for (int i = 0; i < kAcc; ++i) acc_lo[i] = acc_hi[i] = 0;
          for (int z = 0; z < S; ++z) {
            const uint32_t base = mapa(stage0, z);
#pragma unroll
            for (int v = 0; v < kV; ++v)
              add(ld_cluster128(base + (v * 256 + ctid) * 16), ld_cluster128(base + ((kV + v) * 256 + ctid) * 16), v);
          }
          epilogue_direct<kGroup, kTok>(acc_lo, acc_hi, p, m0, nbase + cbase, t, s1h, szh, ash, amh);
        }
        cluster_sync_relaxed();   // the remote values are used; the output stores need not land first
      }
    }
    if constexpr (kMode == kPersistent) {
      // ---------------- epilogue (whole tile: through shared memory, 16-byte stores) ----------------
      if (tid < kTok) {
        const int m = m0 + tid;
        const float sf = m < p.M ? __half2float(p.ascale[m]) : 0.f;
        const float mf = (kGroup == 0 && m < p.M) ? __half2float(p.asum[m]) : 0.f;
        asf[tid] = sf;
        amf[tid] = mf;
      }
      float s1f[4], szf[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {   // q: 0 -> lo row g, 1 -> lo g+8, 2 -> hi g, 3 -> hi g+8
        const int c = cbase + 8 * (q & 1) + 16 * (q >> 1);
        if constexpr (kTok <= 16) {   // loaded when the tile started
          s1f[q] = __half2float(s1h[q]);
          szf[q] = kGroup == 0 ? __half2float(szh[q]) : 0.f;
        } else {
          s1f[q] = __half2float(p.s1[nbase + c]);
          szf[q] = kGroup == 0 ? __half2float(p.szeros[nbase + c]) : 0.f;
        }
      }
      named_bar_sync(bar_id, 128);
#pragma unroll
      for (int i = 0; i < kTok / 8; ++i) {
#pragma unroll
        for (int rp = 0; rp < 2; ++rp) {       // accumulator pair (r = 2rp, 2rp+1): tokens tok, tok+1, same row
          const int tok = 8 * i + 2 * t;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int q = rp + 2 * h;
            const int c = cbase + 8 * rp + 16 * h;
            const int p0 = h ? acc_hi[4 * i + 2 * rp] : acc_lo[4 * i + 2 * rp];
            const int p1 = h ? acc_hi[4 * i + 2 * rp + 1] : acc_lo[4 * i + 2 * rp + 1];
            // QServe's order (common.cuh, qserve_epilogue_f)
            const __half2 o = __halves2half2(qserve_out<kGroup>(p0, s1f[q], szf[q], asf[tok], amf[tok]),
                                             qserve_out<kGroup>(p1, s1f[q], szf[q], asf[tok + 1], amf[tok + 1]));
            T[tok * kEpiStride + c] = __low2half(o);
            T[(tok + 1) * kEpiStride + c] = __high2half(o);
          }
        }
      }
      named_bar_sync(bar_id, 128);
      const uint32_t T0 = smem_addr(T);
#pragma unroll 4
      for (int e = tid; e < kTok * 16; e += 128) {
        const int row = e / 16, chunk = e % 16;
        if (m0 + row < p.M) {
          const uint4 v = lds128(T0 + (row * kEpiStride + chunk * 8) * 2);
          *reinterpret_cast<uint4*>(p.out + static_cast<size_t>(m0 + row) * p.N + nbase + chunk * 8) = v;
        }
      }
    }
  }
#endif
}
