// Device side of the Hopper W4A8 GEMM (included by gemm_wgmma.cu only, inside namespace dcc_w4a8 and its anonymous
// namespace; the design is described at the top of gemm_wgmma.cu). One kernel template, three tile configurations
// of 256 channels: WgCfg<128, 4> (128 tokens, 4 stages: large M), WgCfg<64, 6> (64 tokens, 6 stages: medium M, twice
// the CTAs per layer) and WgCfg<16, 8> (16 tokens, 8 stages: M <= 16, where the kernel streams weights and the wgmma
// N of 16 wastes tensor work nobody waits for).
#pragma once

template <int kTok_, int kStages_, int kWGroup_ = 1>
struct WgCfg {
  static constexpr int kTok = kTok_;                 // tokens per CTA tile (the wgmma N)
  static constexpr int kStages = kStages_;
  // Stages whose weights one bulk copy per 32-channel block brings (kWGroup x 2 KB: a block's k tiles are
  // contiguous). 1: the weights live in the stage; > 1: in a separate region [8 blocks][kStages][2 KB], so that
  // kWGroup consecutive ring slots of a block are contiguous.
  static constexpr int kWGroup = kWGroup_;
  static constexpr int kTileN = 256;                 // output channels per CTA (2 consumer warpgroups x 128)
  static constexpr int kTileK = 128;                 // k per pipeline stage
  static constexpr int kActBytes = kTok * kTileK;    // 128B-swizzled [kTok tokens][128 k]
  static constexpr int kWBytes = kTileN * kTileK / 2;   // 16 KB: [8 channel blocks][4 k tiles][512 B]
  static constexpr int kS2Off = kActBytes + (kWGroup == 1 ? kWBytes : 0);   // s2 region (2 KB) in the stage
  static constexpr int kStageBytes = kS2Off + 2048;   // a multiple of 1024 (SW128 base)
  static constexpr int kWRegionBytes = kWGroup == 1 ? 0 : kStages * kWBytes;
  static constexpr int kEpiStride = 128 + 8;         // halves per token row of a warpgroup's output tile
  static constexpr int kEpiBytes = 2 * kTok * kEpiStride * 2;
  static constexpr int kScaleBytes = 2 * 2 * kTok * (8 + 4);   // per warpgroup: ascale, asum as double and float
  static constexpr int kBarBytes = 2 * kStages * 8 + 16;
  static constexpr int kSmemBytes =
      1024 + kStages * kStageBytes + kWRegionBytes + kEpiBytes + kScaleBytes + kBarBytes;
  static_assert(kStageBytes % 1024 == 0, "stage alignment");
  static_assert(kStages % kWGroup == 0, "weight groups tile the ring");
  static_assert(kSmemBytes <= 232448, "shared memory");
};
using CfgLarge = WgCfg<128, 4>;
using CfgMid = WgCfg<64, 6>;
using CfgSmall = WgCfg<16, 8, 4>;   // 8 KB weight copies
constexpr int kThreads = 384;      // 2 consumer warpgroups + 1 producer warpgroup (one thread issues the copies)

struct WgParams {
  const uint8_t* qweight;
  const __half* ascale;
  const __half* asum;
  const __half* s1;
  const __half* szeros;
  const uint8_t* s2s;
  const uint8_t* s2z;
  __half* out;
  int M, N, K;
  int num_m_tiles;
  int splits;           // K splits = cluster size (1..8); split z takes k stages [z*KT/S, (z+1)*KT/S)
};

#if defined(DCC_WGMMA_DEVICE)
using namespace wgk;

// A lane's 16 weight bytes -> A fragments of the low-nibble slab (lo) and the high-nibble slab (hi), as int8.
template <int kGroup>
__device__ __forceinline__ void unpack(const uint4 w, uint32_t s2w, uint32_t z2w, uint32_t (&lo)[4],
                                       uint32_t (&hi)[4]) {
  const uint32_t r[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo[i] = r[i] & 0x0F0F0F0Fu;
    hi[i] = (r[i] >> 4) & 0x0F0F0F0Fu;
  }
  if constexpr (kGroup > 0) {
    const uint32_t zoff = z2w ^ 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = i & 1;   // a0/a2: row g (byte 0, high: byte 2); a1/a3: row g+8 (byte 1, high: byte 3)
      const uint32_t sl = (s2w >> (8 * j)) & 0xFFu, sh = (s2w >> (8 * (j + 2))) & 0xFFu;
      const uint32_t cl = __byte_perm(zoff, 0, 0x1111u * j), ch = __byte_perm(zoff, 0, 0x1111u * (j + 2));
      lo[i] = (lo[i] * sl + cl) ^ 0x80808080u;
      hi[i] = (hi[i] * sh + ch) ^ 0x80808080u;
    }
  }
}

// Exact epilogue value rounded as the reference does: fp16(float(double(psum*s1*as - sz*asum))). s1d/szd: channel
// scales, asd/amd: token scale and sum, all exact doubles of fp16 values. psum*s1*as is exact in double (<= 47
// significant bits) and the fma rounds once. int32 -> double by the 2^52 magic number (no I2F.F64).
template <int kGroup>
__device__ __forceinline__ __half exact_out(int psum, double s1d, double szd, double asd, double amd) {
  const double pd = __hiloint2double(0x43300000, psum ^ 0x80000000) - 4503601774854144.0;   // 2^52 + 2^31
  double v = (pd * s1d) * asd;
  if (kGroup == 0) v = fma(-szd, amd, v);
  return __float2half_rn(__double2float_rn(v));
}

// Outputs of one thread's fragments straight to global memory (the split-K path, where one CTA writes only some
// warps' channels): the same rounding as the staged epilogue in the kernel. c0 = the channel of row g of the lo
// slab; the thread's rows are c0 + 8rp + 16h, its tokens m0 + 8i + 2t (+1).
template <int kGroup, int kTok>
__device__ __forceinline__ void epilogue_direct(const int (&acc_lo)[kTok / 2], const int (&acc_hi)[kTok / 2],
                                                const WgParams& p, int m0, int c0, int t) {
  float s1f[4], szf[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {   // q = rp + 2h
    const int c = c0 + 8 * (q & 1) + 16 * (q >> 1);
    s1f[q] = __half2float(p.s1[c]);
    szf[q] = kGroup == 0 ? __half2float(p.szeros[c]) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kTok / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {   // token m0 + 8i + 2t + e: accumulators 4i + 2rp + e
      const int m = m0 + 8 * i + 2 * t + e;
      if (m >= p.M) continue;
      const float as = __half2float(p.ascale[m]), am = kGroup == 0 ? __half2float(p.asum[m]) : 0.f;
      __half* orow = p.out + static_cast<size_t>(m) * p.N;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int rp = q & 1, h = q >> 1;
        const int ps = h ? acc_hi[4 * i + 2 * rp + e] : acc_lo[4 * i + 2 * rp + e];
        __half o;
        if (static_cast<uint32_t>(ps + (1 << 22)) < (1u << 23)) {   // see the staged epilogue
          const float pf = __int_as_float(0x4B400000 + ps) - 12582912.f;
          o = __float2half_rn(fmaf(pf, s1f[q] * as, -(szf[q] * am)));
        } else {
          o = exact_out<kGroup>(ps, s1f[q], szf[q], as, am);
        }
        orow[c0 + 8 * rp + 16 * h] = o;
      }
    }
  }
}
#endif

// kSplit: split-K over a cluster (grid.y = cluster size = p.splits > 1, one tile per CTA); else a persistent grid
// with the staged epilogue. Separate instantiations keep each variant's registers and code to what it runs.
template <int kGroup, class C, bool kSplit>
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

  const int num_tiles = p.num_m_tiles * (p.N / kTileN);
  const int split = blockIdx.y;
  const int kt_all = p.K / kTileK;
  const int kt0 = split * kt_all / p.splits;
  const int KT = (split + 1) * kt_all / p.splits - kt0;   // stages of one tile (this split), >= 1

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);   // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  // Let the next kernel in the stream launch (programmatic dependent launch) once every CTA of this grid runs: its
  // CTAs take SMs as this grid's CTAs leave and prefetch what does not depend on this grid's outputs.
  grid_launch_dependents();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= 8) {
    // ---------------- producer: one thread streams every tile's stages through the ring ----------------
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
      // Stages whose weights the copy issued at stage `it` (ring slot s) of a tile brings: a group starts at a
      // tile's first stage and at every kWGroup-aligned slot, and stops at the tile's end and at the next aligned
      // slot (so its slots are contiguous and never wrap); 0 inside a group.
      auto group_len = [&](int it, int s) -> int {
        if (kWGroup == 1) return 1;
        if (it > 0 && s % kWGroup != 0) return 0;
        const int to_slot = kWGroup - s % kWGroup, to_end = KT - it;
        return to_slot < to_end ? to_slot : to_end;
      };
      // Programmatic dependent launch: the weights do not depend on the kernel before this one, so the first ring
      // of the first tile is requested before waiting for it; the activations (its output) only after.
      int pre = 0;
      if (static_cast<int>(blockIdx.x) < num_tiles) {
        const int m0 = (blockIdx.x % p.num_m_tiles) * kTok, n0 = (blockIdx.x / p.num_m_tiles) * kTileN;
        pre = KT < kStages ? KT : kStages;
        for (int it = 0; it < pre; ++it) {   // fresh ring: every stage is free
          // expect_tx before the copies: the TMA box counts in full, rows past M included
          const int len = group_len(it, it);
          mbar_arrive_expect_tx(full0 + 8 * it, bytes + kWBytes * len);
          load_weights(smem_addr(stages + it * kStageBytes), it, kt0 + it, len, n0, full0 + 8 * it);
        }
        grid_dependency_wait();
        for (int it = 0; it < pre; ++it)
          tma_load_2d(smem_addr(stages + it * kStageBytes), &tmap, (kt0 + it) * kTileK, m0, full0 + 8 * it);
      }
      int g_it = 0;
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const int m0 = (tile % p.num_m_tiles) * kTok, n0 = (tile / p.num_m_tiles) * kTileN;
        for (int it = 0; it < KT; ++it, ++g_it) {
          if (g_it < pre) continue;
          const int s = g_it % kStages;
          const uint32_t parity = ((g_it / kStages) & 1) ^ 1;
          mbar_wait(empty0 + 8 * s, parity);
          const int len = group_len(it, s);
          // a group's copy fills slots s .. s+len-1 (same ring round): the consumers release slots in order
          if (len > 1) mbar_wait(empty0 + 8 * (s + len - 1), parity);
          const uint32_t full = full0 + 8 * s;
          mbar_arrive_expect_tx(full, bytes + kWBytes * len);
          const uint32_t st = smem_addr(stages + s * kStageBytes);
          tma_load_2d(st, &tmap, (kt0 + it) * kTileK, m0, full);
          load_weights(st, s, kt0 + it, len, n0, full);
        }
      }
    }
    if constexpr (kSplit) {   // the consumers' two cluster barriers (every thread of the cluster takes part)
      cluster_sync_all();
      cluster_sync_all();
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
  double* asd = scl + wg * 2 * kTok;   // token scale / sum as double (exact path) ...
  double* amd = asd + kTok;
  float* asf = reinterpret_cast<float*>(scl + 4 * kTok) + wg * 2 * kTok;   // ... and as float
  float* amf = asf + kTok;
  __half* T = epi + wg * kTok * kEpiStride;
  int g_it = 0;

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int m0 = (tile % p.num_m_tiles) * kTok, n0 = (tile / p.num_m_tiles) * kTileN;
    const int nbase = n0 + wg * 128;
    int acc_lo[kAcc], acc_hi[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc_lo[i] = acc_hi[i] = 0;

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
      if constexpr (kTok <= 16) {
        // Few tokens: a wgmma is short and the kernel streams weights, so a chain of dependent waits per k32 step
        // would bound it by wgmma latency. Unpack the whole stage (4 steps x 2 slabs = 32 registers), issue its 8
        // wgmmas as one group, and retire the group before the registers are reused; the other warpgroup's work
        // and the producer's copies overlap the wait.
        uint32_t lo[4][4], hi[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int gi = kGroup > 0 ? (j * 32) / (kGroup > 0 ? kGroup : 128) : 0;
          const uint32_t wa = kWGroup == 1 ? st + w_off : wreg + s * 2048;
          unpack<kGroup>(lds128(wa + j * 512), s2w[gi], z2w[gi], lo[j], hi[j]);
        }
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wgmma_s8<kTok>(acc_lo, lo[j], desc + (j * 32 >> 4));
          wgmma_s8<kTok>(acc_hi, hi[j], desc + (j * 32 >> 4));
        }
        wgmma_commit();
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(empty0 + 8 * s);
        continue;
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
    if constexpr (kTok > 16) {
      wgmma_wait<0>();
      if (lane == 0) mbar_arrive(empty0 + 8 * ((g_it - 1) % kStages));   // the tile's last stage
    }

    if constexpr (kSplit) {
      // Split-K over the S CTAs of a cluster (grid.y; one tile per CTA in this mode): each CTA stores its int32
      // partials in its own shared memory (the stage ring: every stage was consumed and its wgmmas retired), a
      // cluster barrier publishes them, and CTA rank r sums all S partials of consumer warps [8r/S, 8(r+1)/S)
      // over distributed shared memory (integer: exact in any order) and writes those warps' outputs. A second
      // barrier keeps every CTA's shared memory alive until the remote reads are done. First, both consumer
      // warpgroups must be done with the ring (their last wgmmas retired): one may finish its k loop while the
      // other still reads the last stages.
      constexpr int kV = kAcc / 4;   // int4 per thread per nibble slab
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
      if (warp * p.splits / 8 == static_cast<int>(cluster_rank())) {
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc_lo[i] = acc_hi[i] = 0;
        for (int z = 0; z < p.splits; ++z) {
          const uint32_t base = mapa(stage0, z);
#pragma unroll
          for (int v = 0; v < kV; ++v) {
            const int4 a = ld_cluster128(base + (v * 256 + ctid) * 16);
            const int4 b = ld_cluster128(base + ((kV + v) * 256 + ctid) * 16);
            acc_lo[4 * v] += a.x; acc_lo[4 * v + 1] += a.y; acc_lo[4 * v + 2] += a.z; acc_lo[4 * v + 3] += a.w;
            acc_hi[4 * v] += b.x; acc_hi[4 * v + 1] += b.y; acc_hi[4 * v + 2] += b.z; acc_hi[4 * v + 3] += b.w;
          }
        }
        epilogue_direct<kGroup, kTok>(acc_lo, acc_hi, p, m0, nbase + cbase, t);
      }
      cluster_sync_all();
    } else {
      // ---------------- epilogue (unsplit: through shared memory, 16-byte stores) ----------------
      if (tid < kTok) {
        const int m = m0 + tid;
        const float sf = m < p.M ? __half2float(p.ascale[m]) : 0.f;
        const float mf = (kGroup == 0 && m < p.M) ? __half2float(p.asum[m]) : 0.f;
        asd[tid] = sf;
        amd[tid] = mf;
        asf[tid] = sf;
        amf[tid] = mf;
      }
      float s1f[4], szf[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {   // q: 0 -> lo row g, 1 -> lo g+8, 2 -> hi g, 3 -> hi g+8
        const int c = cbase + 8 * (q & 1) + 16 * (q >> 1);
        s1f[q] = __half2float(p.s1[nbase + c]);
        szf[q] = kGroup == 0 ? __half2float(p.szeros[nbase + c]) : 0.f;
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
            // float path: a = s1*as and b = sz*asum are exact (fp16 x fp16), psum is exact in float below 2^22, so
            // fma(psum, a, -b) is the exact value rounded once to float: the same float as the double path (up to
            // a double-rounding tie of probability ~2^-29), then one rounding to fp16. Larger |psum|: double path.
            // 1.5 * 2^23 magic number: exact for |p| < 2^22
            const float pf0 = __int_as_float(0x4B400000 + p0) - 12582912.f;
            const float pf1 = __int_as_float(0x4B400000 + p1) - 12582912.f;
            const float v0 = fmaf(pf0, s1f[q] * asf[tok], -(szf[q] * amf[tok]));
            const float v1 = fmaf(pf1, s1f[q] * asf[tok + 1], -(szf[q] * amf[tok + 1]));
            __half2 o = __floats2half2_rn(v0, v1);
            if (__builtin_expect(static_cast<uint32_t>(p0 + (1 << 22)) >= (1u << 23) ||
                                 static_cast<uint32_t>(p1 + (1 << 22)) >= (1u << 23), 0))
              o = __halves2half2(exact_out<kGroup>(p0, s1f[q], szf[q], asd[tok], amd[tok]),
                                 exact_out<kGroup>(p1, s1f[q], szf[q], asd[tok + 1], amd[tok + 1]));
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
