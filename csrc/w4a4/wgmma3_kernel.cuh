// Device side of the Hopper W4A4 GEMM, third kernel (included by gemm_wgmma.cu after wgmma2_kernel.cuh, inside
// namespace dcc_w4a4 and its anonymous namespace): the second kernel's tiles and ring (128 channels x 128 tokens per
// CTA, two consumer warpgroups of 64 channels sharing one ring of 128-k stages, fp8 e4m3 operands), with the main
// loop software-pipelined inside each warpgroup.
//
// Why: in the second kernel a warpgroup issues a group's two wgmmas, waits for them, then folds the group on the CUDA
// cores, so its tensor-core work and its folding never overlap; the two warpgroups read the same stage and drift into
// step, so the SM's tensor cores idle while both fold (measured 25-35 % of the int8 peak). The fold costs two
// instructions per output and 64-k group (FMUL of the two scales, FFMA), the same issue time as the group's 64
// multiply-adds take on the tensor cores (64 / 4096 of an SM-cycle per output against 2 / 128): the kernel can only
// approach the peak if the two run at the same time.
//  - Two sets of group sums (sa, sb: 64 fp32 registers each, beside the 64 accumulators; 192 of the 232 a consumer
//    thread has): a stage's group 0 goes to sa, group 1 to sb. While sb's wgmmas run, sa's group is folded; then the
//    next stage's group 0 is issued into sa and sb is folded while it runs. Each fold follows a `wgmma.wait_group 1`,
//    so the tensor cores always have the next group queued. The per-output steps and their order are the second
//    kernel's (fold_group), so the main loop's result is the same bits.
//  - Epilogue, kLoraTc = false: bias, then the low-rank fma chain (lora_fma_chunk), then one rounding -- the same bits
//    as the other kernels and the CPU emulation.
//  - kLoraTc = true (path "wgmma_tc"): the low-rank up-projection on the tensor cores, into the accumulators
//    themselves (scale-d = 1) after the main loop: D += lora_up . lora_act^T as tf32 wgmmas (m64n128k8). lora_up's
//    16-bit values are exact in tf32 (an fp32 copy, [N, R], made once per layer); lora_act (fp32) is split by the
//    consumers into hi = its top 11 significant bits and lo = (x - hi) to 11 bits, two exact tf32 values, so
//    hi + lo differs from x by at most 2^-21 |x| and each product is exact in fp32: the branch costs no CUDA-core
//    instruction per output (the fma chain cost 32 per output, a third of the main loop's at K = 3072) and about
//    2 x R / 4 / K of the tensor-core time (8 % at K = 3072, R = 32). Then bias, then one rounding. The tensor cores'
//    fp32 accumulation order is not specified, so this is not bit-identical to the emulation: before the 16-bit
//    rounding the result differs from the exact value of the stored codes and scales by about 1e-6 of the magnitude
//    of its terms at most (tests compare it with the exact result, not bit for bit).
// Requirements (checked by the host): fp8 codes, N % 128 == 0, R % 32 == 0, lora_act (and lora_up) 16-byte aligned.
#pragma once

template <bool kLoraTc>
struct Wg3Cfg {
  static constexpr int kTok = 128, kCh = 128, kTileK = 128, kStages = 4;
  static constexpr int kABytes = kCh * kTileK;          // weight codes [128 ch][128 k], 128B-swizzled
  static constexpr int kBBytes = kTok * kTileK;         // activation codes [128 tok][128 k], 128B-swizzled
  static constexpr int kWsOff = kABytes + kBBytes;      // wscales fp32 [2 groups][128 ch]
  static constexpr int kAsOff = kWsOff + 2 * kCh * 4;   // ascales fp32 [2 groups][128 tok], tok_pos order
  static constexpr int kStageBytes = kAsOff + 2 * kTok * 4;   // 34816: every stage 1024-byte aligned
  static constexpr int kRank = 32;                      // ranks per epilogue chunk
  static constexpr int kLaBytes = kTok * kRank * 4;     // lora_act [128 tok][32 r] fp32, 128B-swizzled (tc: hi)
  static constexpr int kLoBytes = kLoraTc ? kLaBytes : 0;              // tc: lo, the same layout
  static constexpr int kUpBytes = kCh * kRank * (kLoraTc ? 4 : 2);     // lora_up fp32 128B-swizzled (tc) / 16-bit
  static constexpr int kEpiBytes = kLaBytes + kLoBytes + kUpBytes;
  static constexpr int kOutStride = 64 + 8;             // 16-bit values per token row of a warpgroup's output
  static constexpr int kOutBytes = kTok * kOutStride * 2;
  static constexpr int kBarOff = kStages * kStageBytes + kEpiBytes + 2 * kOutBytes;
  static constexpr int kSmemBytes = 1024 + kBarOff + (2 * kStages + 2) * 8;
  static_assert(kStageBytes % 1024 == 0 && kLaBytes % 1024 == 0 && kUpBytes % 1024 == 0, "SW128 alignment");
  static_assert(kSmemBytes <= 232448, "shared memory");
};

#if defined(DCC_W4A4_WGMMA_DEVICE)
// One 32-rank chunk of the low-rank branch on the tensor cores (path wgmma_tc), by the 256 threads of the two
// consumer warpgroups: lora_act at la_s ([128 tok][32 r] fp32, 128B-swizzled, landed by TMA) split into tf32 hi (in
// place) and lo (at lo_s, the same element map, so the same swizzled layout), then acc += up . (lo + hi)^T as tf32
// wgmmas (m64n128k8, scale-d = 1; A = this warpgroup's 64 rows of lora_up's fp32 copy at up_s). Returns with the
// wgmmas retired.
__device__ __forceinline__ void lora_tc_chunk(float (&acc)[64], uint32_t la_s, uint32_t lo_s, uint32_t up_s, int wg) {
  using namespace sm90;
#pragma unroll
  for (int q = 0; q < 4; ++q) {   // 4096 floats, 16 a thread
    const uint32_t off = (threadIdx.x + 256 * q) * 16;
    const float4 v = lds_f32x4(la_s + off);
    float4 hi, lo;
    hi.x = __uint_as_float(__float_as_uint(v.x) & 0xFFFFE000u);
    hi.y = __uint_as_float(__float_as_uint(v.y) & 0xFFFFE000u);
    hi.z = __uint_as_float(__float_as_uint(v.z) & 0xFFFFE000u);
    hi.w = __uint_as_float(__float_as_uint(v.w) & 0xFFFFE000u);
    // x - hi is exact (the low bits of x); its own low 13 bits are dropped too, so lo is an exact tf32 value
    lo.x = __uint_as_float(__float_as_uint(__fsub_rn(v.x, hi.x)) & 0xFFFFE000u);
    lo.y = __uint_as_float(__float_as_uint(__fsub_rn(v.y, hi.y)) & 0xFFFFE000u);
    lo.z = __uint_as_float(__float_as_uint(__fsub_rn(v.z, hi.z)) & 0xFFFFE000u);
    lo.w = __uint_as_float(__float_as_uint(__fsub_rn(v.w, hi.w)) & 0xFFFFE000u);
    sts_f32x4(la_s + off, hi);
    sts_f32x4(lo_s + off, lo);
  }
  fence_proxy_async();      // these writes are read by wgmma (the async proxy)
  named_bar_sync(3, 256);   // both warpgroups' shares are written
  const uint64_t du = desc_sw128(up_s + wg * 64 * 128), dh = desc_sw128(la_s), dl = desc_sw128(lo_s);
  wgmma_fence();
#pragma unroll
  for (int k8 = 0; k8 < 4; ++k8) wgmma_m64n128k8_tf32(acc, du + 2 * k8, dl + 2 * k8);
#pragma unroll
  for (int k8 = 0; k8 < 4; ++k8) wgmma_m64n128k8_tf32(acc, du + 2 * k8, dh + 2 * k8);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
}
#endif

#if defined(DCC_W4A4_WGMMA_DEVICE)
// The ring's and the low-rank buffer's mbarriers at bars (full[kStages], empty[kStages], epi_full, epi_empty), set
// by thread 0 and made visible to the CTA; `readers`: the consumer warps that release each stage and chunk.
template <int kStages>
__device__ __forceinline__ void init_ring_bars(uint32_t bars, uint32_t readers) {
  using namespace sm90;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (kStages + s), readers);
    }
    mbar_init(bars + 16 * kStages, 1);
    mbar_init(bars + 16 * kStages + 8, readers);
    fence_barrier_init();
  }
  __syncthreads();
}

// The third kernel's producers (one thread each; barriers at bars: full[kStages], empty[kStages],
// epi_full, epi_empty). The ring (the second kernel's): the first stages' weights before griddepcontrol.wait (they do
// not depend on quant_act), then the activations; tile order blockIdx.x + i * gridDim.x, m fastest.
template <class C>
__device__ __forceinline__ void produce_ring(const CUtensorMap* tm_w, const CUtensorMap* tm_a,
                                             const CUtensorMap* tm_ws, const CUtensorMap* tm_as, const WgArgs& p,
                                             uint32_t ring0, uint32_t bars) {
  using namespace sm90;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes;
  const int KT = p.K / C::kTileK;
  auto tile_m0 = [&](int tile) { return (tile % p.num_m_tiles) * C::kTok; };
  auto tile_n0 = [&](int tile) { return (tile / p.num_m_tiles) * C::kCh; };
  const int first = blockIdx.x;
  const int pre = first < p.num_tiles ? min(kStages, KT) : 0;
  const int fn0 = pre ? tile_n0(first) : 0, fm0 = pre ? tile_m0(first) : 0;
  for (int s = 0; s < pre; ++s) {
    const uint32_t full = bars + 8 * s, st = ring0 + s * kStageBytes;
    mbar_arrive_expect_tx(full, kStageBytes);
    tma_load_2d(st, tm_w, s * C::kTileK, fn0, full);
    tma_load_2d(st + C::kWsOff, tm_ws, fn0, 2 * s, full);
  }
  grid_dependency_wait();
  for (int s = 0; s < pre; ++s) {
    const uint32_t full = bars + 8 * s, st = ring0 + s * kStageBytes;
    tma_load_2d(st + C::kABytes, tm_a, s * C::kTileK, fm0, full);
    tma_load_2d(st + C::kAsOff, tm_as, fm0, 2 * s, full);
  }
  int it = 0;
  for (int tile = first; tile < p.num_tiles; tile += gridDim.x) {
    const int m0 = tile_m0(tile), n0 = tile_n0(tile);
    for (int kt = 0; kt < KT; ++kt, ++it) {
      if (it < pre) continue;
      const int s = it % kStages;
      mbar_wait(bars + 8 * (kStages + s), ((it / kStages) & 1) ^ 1);
      const uint32_t full = bars + 8 * s, st = ring0 + s * kStageBytes;
      mbar_arrive_expect_tx(full, kStageBytes);
      tma_load_2d(st, tm_w, kt * C::kTileK, n0, full);
      tma_load_2d(st + C::kABytes, tm_a, kt * C::kTileK, m0, full);
      tma_load_2d(st + C::kWsOff, tm_ws, n0, 2 * kt, full);
      tma_load_2d(st + C::kAsOff, tm_as, m0, 2 * kt, full);
    }
  }
}

// Each tile's low-rank chunks through one buffer (lora_act at la_s, lora_up at up_s), as soon as it is free.
template <class C>
__device__ __forceinline__ void produce_epi(const CUtensorMap* tm_la, const CUtensorMap* tm_up, const WgArgs& p,
                                            uint32_t la_s, uint32_t up_s, uint32_t bars) {
  using namespace sm90;
  const int chunks = p.R / C::kRank;
  if (chunks == 0) return;
  const uint32_t epi_full = bars + 16 * C::kStages, epi_empty = epi_full + 8;
  grid_dependency_wait();
  int ec = 0;
  for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    for (int c = 0; c < chunks; ++c, ++ec) {
      mbar_wait(epi_empty, (ec & 1) ^ 1);
      mbar_arrive_expect_tx(epi_full, C::kLaBytes + C::kUpBytes);
      tma_load_2d(la_s, tm_la, c * C::kRank, (tile % p.num_m_tiles) * C::kTok, epi_full);
      tma_load_2d(up_s, tm_up, c * C::kRank, (tile / p.num_m_tiles) * C::kCh, epi_full);
    }
  }
}
#endif

template <class T, bool kLoraTc>
__global__ void __launch_bounds__(kWgThreads, 1) w4a4_wgmma3_kernel(const __grid_constant__ CUtensorMap tm_w,
                                                                    const __grid_constant__ CUtensorMap tm_a,
                                                                    const __grid_constant__ CUtensorMap tm_ws,
                                                                    const __grid_constant__ CUtensorMap tm_as,
                                                                    const __grid_constant__ CUtensorMap tm_la,
                                                                    const __grid_constant__ CUtensorMap tm_up,
                                                                    const WgArgs p) {
#if defined(DCC_W4A4_WGMMA_DEVICE)
  using namespace sm90;
  using C = Wg3Cfg<kLoraTc>;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kTok = C::kTok, kAcc = kTok / 2;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t ring0 = smem_addr(smem);
  const uint32_t la_s = ring0 + kStages * kStageBytes, lo_s = la_s + C::kLaBytes, up_s = lo_s + C::kLoBytes;
  const uint32_t bars = ring0 + C::kBarOff;   // full[kStages], empty[kStages], epi_full, epi_empty
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t epi_full = bars + 16 * kStages, epi_empty = epi_full + 8;

  init_ring_bars<kStages>(bars, 8);   // one arrive per consumer warp: both warpgroups read every stage

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int KT = p.K / C::kTileK, chunks = p.R / C::kRank;
  auto tile_m0 = [&](int tile) { return (tile % p.num_m_tiles) * kTok; };
  auto tile_n0 = [&](int tile) { return (tile / p.num_m_tiles) * C::kCh; };
  if (warp >= 8) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) produce_ring<C>(&tm_w, &tm_a, &tm_ws, &tm_as, p, ring0, bars);
    else if (warp == 9 && lane == 0) produce_epi<C>(&tm_la, &tm_up, p, la_s, up_s, bars);
    return;
  }

  // ---------------- consumers: warpgroup wg computes channels n0 + 64 wg .. + 63 of every tile of this CTA -------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  grid_dependency_wait();
  const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const int row0 = 16 * wq + g, ch0 = 64 * wg + row0;
  T* out_s = reinterpret_cast<T*>(smem + kStages * kStageBytes + C::kEpiBytes + wg * C::kOutBytes);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  float acc[kAcc], sa[kAcc / 2], sb[kAcc / 2];
  // the 64 x 64 block of token half h of group j of the stage at st: two k32 wgmmas, the first with scale-d = 0;
  // the half's 64 token rows start 8 KB (whole swizzle atoms) into the stage's activation codes
  auto issue = [&](float (&sums)[kAcc / 2], uint32_t st, int j, int h) {
    const uint64_t da = desc_sw128(st + wg * 64 * C::kTileK), db = desc_sw128(st + C::kABytes + h * 64 * C::kTileK);
    wgmma_fence();
    wgmma_tile<64, 0>(sums, da + 4 * j, db + 4 * j);
    wgmma_tile<64, 1>(sums, da + 4 * j + 2, db + 4 * j + 2);
    wgmma_commit();
  };
  // fold_group over the half's 32 accumulators (tokens 64h + 8i + 2t + e are acc[32h + 4i + ...])
  auto fold = [&](const float (&sums)[kAcc / 2], uint32_t st, int j, int h) {
    const float w0 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0) * 4);
    const float w1 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0 + 8) * 4);
    fold_group<64, 2>(*reinterpret_cast<float(*)[kAcc / 2]>(acc + h * kAcc / 2), sums, w0, w1,
                      st + C::kAsOff + (j * kTok + 64 * h + 4 * t) * 4);
  };
  auto stage_at = [&](int i) { return ring0 + (i % kStages) * kStageBytes; };
  int it = 0, ec = 0;

  for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const int m0 = tile_m0(tile), n0 = tile_n0(tile);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

    // units (group j, token half h) in the order (0,0) (0,1) (1,0) (1,1): half 0 in sa, half 1 in sb; each fold
    // runs while the next unit's wgmmas are queued (wait_group 1), so the tensor cores never wait on the fold
    // Stage `it`, sa holding its unit (0, 0) in flight on entry; with next = true, the next stage's unit (0, 0) is
    // issued into sa before the last fold, so the stage ends with sa in flight again.
    auto run_stage = [&](auto next) {
      const uint32_t st = stage_at(it);
      issue(sb, st, 0, 1);
      wgmma_wait<1>();
      fence_operands(sa);
      fold(sa, st, 0, 0);
      issue(sa, st, 1, 0);
      wgmma_wait<1>();
      fence_operands(sb);
      fold(sb, st, 0, 1);
      issue(sb, st, 1, 1);
      wgmma_wait<1>();
      fence_operands(sa);
      fold(sa, st, 1, 0);
      if constexpr (decltype(next)::value) {
        mbar_wait(full_bar((it + 1) % kStages), ((it + 1) / kStages) & 1);
        issue(sa, stage_at(it + 1), 0, 0);
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      fence_operands(sb);
      fold(sb, st, 1, 1);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar(it % kStages));   // wgmmas of this stage retired, its scales read
      ++it;
    };
    // Stages in pairs, the first handing its successor's first unit to the tensor cores before its last fold: a
    // wgmma in flight across a loop's back edge whose registers are then read makes ptxas serialize every wgmma
    // (C7514), so nothing is in flight there, and one fold in eight runs with the tensor cores idle (for this
    // warpgroup; the other warpgroup's wgmmas may fill the gap).
    for (int kt = 0; kt < KT;) {
      mbar_wait(full_bar(it % kStages), (it / kStages) & 1);
      issue(sa, stage_at(it), 0, 0);
      if (kt + 1 < KT) {
        run_stage(std::true_type{});
        run_stage(std::false_type{});
        kt += 2;
      } else {
        run_stage(std::false_type{});
        kt += 1;
      }
    }

    // ---------------- epilogue --------------------------------------------------------------------------------
    if constexpr (kLoraTc) {
      for (int c = 0; c < chunks; ++c, ++ec) {
        mbar_wait(epi_full, ec & 1);
        lora_tc_chunk(acc, la_s, lo_s, up_s, wg);
        fence_proxy_async();             // the split's writes are ordered before the next TMA into the buffer
        __syncwarp();
        if (lane == 0) mbar_arrive(epi_empty);
      }
      add_bias<T, kTok>(acc, bias, n0 + ch0);
    } else {
      add_bias<T, kTok>(acc, bias, n0 + ch0);
      for (int c = 0; c < chunks; ++c, ++ec) {
        mbar_wait(epi_full, ec & 1);
        lora_fma_chunk<T, kTok, C::kRank>(acc, la_s, up_s + ch0 * C::kRank * 2, t);
        __syncwarp();
        if (lane == 0) mbar_arrive(epi_empty);
      }
    }
    store_tile<T, kTok, C::kOutStride>(acc, out_s, out, row0, t, tid, 1 + wg, m0, n0 + 64 * wg, p.M, p.N);
  }
#endif
}
