// Device side of the Hopper W4A4 GEMM, second kernel (included by gemm_wgmma.cu after wgmma_kernel.cuh, inside
// namespace dcc_w4a4 and its anonymous namespace). The same steps per output as w4a4_wgmma_kernel, in the same order,
// so the same bits; what changes is how tiles meet the memory system:
//  - CTA tile 128 channels x 128 tokens: the two consumer warpgroups take the two 64-channel halves of one tile and
//    share its activation codes, one ring for both (a stage: 128 x 128 weight codes, 128 x 128 activation codes and
//    both operands' scales of two 64-k groups; freed when the 8 consumer warps have read it). Bytes from L2 per
//    multiply-add fall by a third against the first kernel's private 64 x 128 tiles (60 instead of 40 MACs per
//    byte, scales counted), whose measured 545-585 TOPS fit an L2-bandwidth limit (~7 TB/s).
//  - The low-rank epilogue's operands come by TMA, issued by a second producer thread while the tile's main loop
//    runs: lora_act rows [128 tokens][32 ranks] fp32 (128-byte swizzle: chunk c of token row r at c ^ (r % 8), so a
//    thread's 16-byte loads of four ranks of tokens 2t, 2t + 1 fall in distinct banks) and lora_up [128 ch][32] in
//    16 bits, one 32-rank chunk at a time (epi_full / epi_empty), instead of being gathered by the consumers after
//    their main loop (about 4,000 cycles of exposed global-load latency per tile in the first kernel).
//  - Its own output staging per warpgroup (the first kernel reused the low-rank staging for it).
//  - kMc = 1: CTA pairs (clusters of 2) take tiles of the same 128 tokens and neighbouring 128-channel blocks; each
//    CTA's producer loads half of the activation codes (64 tokens) and multicasts it into both CTAs, so a CTA reads
//    16 KB of weights + 8 KB of activations (+ 2 KB of scales) from L2 per stage (79 MACs per byte). A stage slot is
//    free when the consumers of both CTAs have read it: each consumer warp arrives on its own CTA's empty barrier and
//    on the peer's (16 arrivals), and each producer waits on its own. N % 256 == 0.
// Requirements (checked by the host): N % 128 == 0, R % 32 == 0 (R = 0: no branch), lora_act 16-byte aligned.
#pragma once

struct Wg2Cfg {
  static constexpr int kTok = 128;                      // tokens per tile (the wgmma N)
  static constexpr int kCh = 128;                       // channels per tile: two warpgroups of 64 (the wgmma M)
  static constexpr int kTileK = 128;                    // k per stage: two 64-k groups
  static constexpr int kStages = 4;
  static constexpr int kABytes = kCh * kTileK;          // weight codes [128 ch][128 k], 128B-swizzled
  static constexpr int kBBytes = kTok * kTileK;         // activation codes [128 tok][128 k], 128B-swizzled
  static constexpr int kWsOff = kABytes + kBBytes;      // wscales fp32 [2 groups][128 ch]
  static constexpr int kAsOff = kWsOff + 2 * kCh * 4;   // ascales fp32 [2 groups][128 tok], tok_pos order
  static constexpr int kStageBytes = kAsOff + 2 * kTok * 4;   // 34816 = 34 KB: every stage 1024-byte aligned
  static constexpr int kRank = 32;                      // ranks per epilogue chunk
  static constexpr int kLaBytes = kTok * kRank * 4;     // lora_act [128 tok][32 r] fp32, 128B-swizzled rows
  static constexpr int kUpBytes = kCh * kRank * 2;      // lora_up [128 ch][32 r] 16-bit
  static constexpr int kEpiBytes = kLaBytes + kUpBytes;
  static constexpr int kOutStride = 64 + 8;             // 16-bit values per token row of a warpgroup's output
  static constexpr int kOutBytes = kTok * kOutStride * 2;
  static constexpr int kBarOff = kStages * kStageBytes + kEpiBytes + 2 * kOutBytes;
  static constexpr int kSmemBytes = 1024 + kBarOff + (2 * kStages + 2) * 8;
  static_assert(kStageBytes % 1024 == 0 && (kStages * kStageBytes) % 1024 == 0, "SW128 tiles need 1024 alignment");
  static_assert(kSmemBytes <= 232448, "shared memory");
};

#if defined(DCC_W4A4_WGMMA_DEVICE)
// One 32-rank chunk of the low-rank epilogue on the CUDA cores, ranks in order: acc = fma(lora_act[m, r], up[n, r],
// acc) for this thread's channels (up0: the staged lora_up row of its first channel, [ch][kRank] 16-bit; the second
// is 8 rows on) and tokens 8i + 2t + e. la_s: lora_act [kTok tokens][kRank] fp32, 128-byte swizzled rows (chunk c of
// row r at c ^ (r % 8)), so a thread's 16-byte loads of four ranks of tokens 2t, 2t + 1 fall in distinct banks.
template <class T, int kTok, int kRank>
__device__ __forceinline__ void lora_fma_chunk(float (&acc)[kTok / 2], uint32_t la_s, uint32_t up0, int t) {
  using namespace sm90;
  const uint32_t up1 = up0 + 8 * kRank * 2;
#pragma unroll 1
  for (int r4 = 0; r4 < kRank; r4 += 4) {
    float u0[4], u1[4];
    {
      uint32_t a, b, c2, d;
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(a), "=r"(b) : "r"(up0 + r4 * 2));
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(c2), "=r"(d) : "r"(up1 + r4 * 2));
      const uint32_t w0[2] = {a, b}, w1[2] = {c2, d};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint16_t h0 = static_cast<uint16_t>(w0[q / 2] >> (16 * (q % 2)));
        const uint16_t h1 = static_cast<uint16_t>(w1[q / 2] >> (16 * (q % 2)));
        u0[q] = Sixteen<T>::to_f(*reinterpret_cast<const T*>(&h0));
        u1[q] = Sixteen<T>::to_f(*reinterpret_cast<const T*>(&h1));
      }
    }
#pragma unroll
    for (int i = 0; i < kTok / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = 8 * i + 2 * t + e;
        const float4 l = lds_f32x4(la_s + tok * 128 + (((r4 / 4) ^ (tok & 7)) * 16));
        const float lv[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {   // ranks in order
          acc[4 * i + e] = __fmaf_rn(lv[q], u0[q], acc[4 * i + e]);
          acc[4 * i + 2 + e] = __fmaf_rn(lv[q], u1[q], acc[4 * i + 2 + e]);
        }
      }
  }
}
#endif

template <class T, int kCvt, int kMc>
__global__ void __launch_bounds__(kWgThreads, 1) w4a4_wgmma2_kernel(const __grid_constant__ CUtensorMap tm_w,
                                                                    const __grid_constant__ CUtensorMap tm_a,
                                                                    const __grid_constant__ CUtensorMap tm_ws,
                                                                    const __grid_constant__ CUtensorMap tm_as,
                                                                    const __grid_constant__ CUtensorMap tm_la,
                                                                    const __grid_constant__ CUtensorMap tm_up,
                                                                    const WgArgs p) {
#if defined(DCC_W4A4_WGMMA_DEVICE)
  using namespace sm90;
  using C = Wg2Cfg;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kTok = C::kTok, kAcc = kTok / 2;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t ring0 = smem_addr(smem);
  const uint32_t la_s = ring0 + kStages * kStageBytes, up_s = la_s + C::kLaBytes;
  const uint32_t bars = ring0 + C::kBarOff;   // full[kStages], empty[kStages], epi_full, epi_empty
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t epi_full = bars + 16 * kStages, epi_empty = epi_full + 8;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar(s), 1);
      // one arrive per consumer warp (both warpgroups read every stage), of both CTAs of a pair with kMc
      mbar_init(empty_bar(s), kMc ? 16 : 8);
    }
    mbar_init(epi_full, 1);
    mbar_init(epi_empty, 8);
    fence_barrier_init();
  }
  __syncthreads();
  if constexpr (kMc) cluster_sync();   // the peer's barriers are initialised before anything reaches them

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int KT = p.K / C::kTileK, chunks = p.R / C::kRank;
  // tile index -> (first token, first channel): a pair's two CTAs (kMc) share the tokens, channel blocks 2q, 2q + 1
  const uint32_t rank = kMc ? cluster_ctarank() : 0;
  const int first_tile = kMc ? blockIdx.x / 2 : blockIdx.x, tile_step = kMc ? gridDim.x / 2 : gridDim.x;
  auto tile_m0 = [&](int tile) { return (tile % p.num_m_tiles) * kTok; };
  auto tile_n0 = [&](int tile) {
    return kMc ? ((tile / p.num_m_tiles) * 2 + static_cast<int>(rank)) * C::kCh : (tile / p.num_m_tiles) * C::kCh;
  };
  // this CTA's activation codes of a stage: all 128 tokens, or (kMc) its 64-token half, multicast to both CTAs
  auto load_acts = [&](uint32_t st, int k0, int m0, uint32_t full) {
    if constexpr (kMc)
      tma_load_2d_mc(st + C::kABytes + rank * (C::kBBytes / 2), &tm_a, k0, m0 + static_cast<int>(rank) * kTok / 2,
                     full, 0x3);
    else
      tma_load_2d(st + C::kABytes, &tm_a, k0, m0, full);
  };
  if (warp >= 8) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      // ---------------- ring producer: weights first (PDL: they do not depend on quant_act), then activations ---
      const int first = first_tile;
      const int pre = first < p.num_tiles ? min(kStages, KT) : 0;
      const int fn0 = pre ? tile_n0(first) : 0, fm0 = pre ? tile_m0(first) : 0;
      for (int s = 0; s < pre; ++s) {
        const uint32_t full = full_bar(s), st = ring0 + s * kStageBytes;
        mbar_arrive_expect_tx(full, kStageBytes);
        tma_load_2d(st, &tm_w, s * C::kTileK, fn0, full);
        tma_load_2d(st + C::kWsOff, &tm_ws, fn0, 2 * s, full);
      }
      grid_dependency_wait();
      for (int s = 0; s < pre; ++s) {
        const uint32_t full = full_bar(s), st = ring0 + s * kStageBytes;
        load_acts(st, s * C::kTileK, fm0, full);
        tma_load_2d(st + C::kAsOff, &tm_as, fm0, 2 * s, full);
      }
      int it = 0;
      for (int tile = first; tile < p.num_tiles; tile += tile_step) {
        const int m0 = tile_m0(tile), n0 = tile_n0(tile);
        for (int kt = 0; kt < KT; ++kt, ++it) {
          if (it < pre) continue;
          const int s = it % kStages;
          mbar_wait(empty_bar(s), ((it / kStages) & 1) ^ 1);
          const uint32_t full = full_bar(s), st = ring0 + s * kStageBytes;
          mbar_arrive_expect_tx(full, kStageBytes);
          tma_load_2d(st, &tm_w, kt * C::kTileK, n0, full);
          load_acts(st, kt * C::kTileK, m0, full);
          tma_load_2d(st + C::kWsOff, &tm_ws, n0, 2 * kt, full);
          tma_load_2d(st + C::kAsOff, &tm_as, m0, 2 * kt, full);
        }
      }
    } else if (warp == 9 && lane == 0 && chunks > 0) {
      // ---------------- epilogue producer: each tile's low-rank chunks, one buffer, as soon as it is free -------
      grid_dependency_wait();   // lora_act is quant_act's output
      int ec = 0;
      for (int tile = first_tile; tile < p.num_tiles; tile += tile_step) {
        const int m0 = tile_m0(tile), n0 = tile_n0(tile);
        for (int c = 0; c < chunks; ++c, ++ec) {
          mbar_wait(epi_empty, (ec & 1) ^ 1);
          mbar_arrive_expect_tx(epi_full, C::kEpiBytes);
          tma_load_2d(la_s, &tm_la, c * C::kRank, m0, epi_full);
          tma_load_2d(up_s, &tm_up, c * C::kRank, n0, epi_full);
        }
      }
    }
    __syncwarp();
    if constexpr (kMc) cluster_sync();   // no CTA leaves while its peer may still arrive on its barriers
    return;
  }

  // ---------------- consumers: warpgroup wg computes channels n0 + 64 wg .. + 63 of every tile of this CTA -------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  grid_dependency_wait();   // the output is written after the previous kernel completed
  const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const int row0 = 16 * wq + g;             // this thread's channels within the half: row0, row0 + 8
  const int ch0 = 64 * wg + row0;           // ... within the tile
  T* out_s = reinterpret_cast<T*>(smem + kStages * kStageBytes + C::kEpiBytes + wg * C::kOutBytes);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  int it = 0, ec = 0;
  std::conditional_t<kCvt == 2, float, int> isum[kAcc];
  float acc[kAcc];
  // psum of group j of the stage at st: two k32 wgmmas, the first overwriting the accumulators (scale-d = 0); this
  // warpgroup's 64 weight rows start 64 rows (8 KB, whole 1024-byte swizzle atoms) into the stage
  auto issue = [&](auto& sums, uint32_t st, int j) {
    const uint64_t da = desc_sw128(st + wg * 64 * C::kTileK), db = desc_sw128(st + C::kABytes);
    wgmma_fence();
    wgmma_tile<kTok, 0>(sums, da + 4 * j, db + 4 * j);
    wgmma_tile<kTok, 1>(sums, da + 4 * j + 2, db + 4 * j + 2);
    wgmma_commit();
  };
  // the group's fold (wgmma_kernel.cuh fold_group): this warpgroup's channels of the tile's 128 weight scales
  auto fold = [&](auto& sums, uint32_t st, int j) {
    const float w0 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0) * 4);
    const float w1 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0 + 8) * 4);
    fold_group<kTok, kCvt>(acc, sums, w0, w1, st + C::kAsOff + (j * kTok + 4 * t) * 4);
  };
  // this warp has read the stage (wgmmas retired, scales read); with kMc the peer multicasts into it too
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) {
      mbar_arrive(empty_bar(s));
      if constexpr (kMc) mbar_arrive_remote(empty_bar(s), rank ^ 1);
    }
  };

  for (int tile = first_tile; tile < p.num_tiles; tile += tile_step) {
    const int m0 = tile_m0(tile), n0 = tile_n0(tile);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

    for (int kt = 0; kt < KT; ++kt, ++it) {
      const int s = it % kStages;
      mbar_wait(full_bar(s), (it / kStages) & 1);
      const uint32_t st = ring0 + s * kStageBytes;
#pragma unroll
      for (int j = 0; j < 2; ++j) {   // the stage's two 64-k groups, in k order
        issue(isum, st, j);
        wgmma_wait<0>();
        fence_operands(isum);
        fold(isum, st, j);
      }
      release(s);
    }

    // ---------------- epilogue: bias, low rank (ranks in order), one rounding, 16-byte stores -------------------
    add_bias<T, kTok>(acc, bias, n0 + ch0);
    for (int c = 0; c < chunks; ++c, ++ec) {
      mbar_wait(epi_full, ec & 1);
      lora_fma_chunk<T, kTok, C::kRank>(acc, la_s, up_s + ch0 * C::kRank * 2, t);
      __syncwarp();
      if (lane == 0) mbar_arrive(epi_empty);   // this warp has read the chunk
    }
    // the staging is free once the previous tile's output has been read out of it
    store_tile<T, kTok, C::kOutStride>(acc, out_s, out, row0, t, tid, 1 + wg, m0, n0 + 64 * wg, p.M, p.N);
  }
  if constexpr (kMc) cluster_sync();
#endif
}
