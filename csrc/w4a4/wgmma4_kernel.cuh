// Device side of the Hopper W4A4 GEMM, fourth kernel (included by gemm_wgmma.cu after wgmma3_kernel.cuh, inside
// namespace dcc_w4a4 and its anonymous namespace): kernel 2's CTA tile and ring, computed by four consumer warpgroups
// of 64 x 64 quadrants instead of two of 64 x 128 halves.
//
// Why: ncu of kernels 2 and 3 (DESIGN.md) shows no unit saturated -- issue slots 46 % busy, shared memory 66 %, the
// tensor cores ~24 % -- with two consumer warps per scheduler each issuing every ~5 cycles: the latencies of a group
// (the wgmma wait, the scale loads ahead of the FMULs) are not hidden. Four consumer warpgroups put four consumer
// warps on each scheduler, with 32 accumulators + 32 sums a thread (the 640-thread CTA's registers: 96 a thread at
// compile time, up to 112 after setmaxnreg; 20 bytes spilled). The per-output steps of fold_group and kernel 2's
// epilogue, in the same order: the same bits.
//  - Warpgroup q (0..3) takes channels 64 (q / 2) .. + 63 and tokens 64 (q % 2) .. + 63 of the 128 x 128 tile: per
//    64-k group two m64n64k32 e4m3 wgmmas (weight rows and token rows 8 KB apart in the swizzled stage), wait, fold.
//  - Warpgroup 4 produces (produce_ring / produce_epi, the third kernel's); 16 consumer warps release each stage and
//    each low-rank chunk.
// Requirements (checked by the host): fp8 codes, N % 128 == 0, R % 32 == 0, lora_act and lora_up 16-byte aligned.
#pragma once

constexpr int kWg4Threads = 640;   // four consumer warpgroups + one producer warpgroup

template <class T>
__global__ void __launch_bounds__(kWg4Threads, 1) w4a4_wgmma4_kernel(const __grid_constant__ CUtensorMap tm_w,
                                                                     const __grid_constant__ CUtensorMap tm_a,
                                                                     const __grid_constant__ CUtensorMap tm_ws,
                                                                     const __grid_constant__ CUtensorMap tm_as,
                                                                     const __grid_constant__ CUtensorMap tm_la,
                                                                     const __grid_constant__ CUtensorMap tm_up,
                                                                     const WgArgs p) {
#if defined(DCC_W4A4_WGMMA_DEVICE)
  using namespace sm90;
  using C = Wg3Cfg<false>;   // the third kernel's shared-memory layout (its output staging split in four)
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kQ = 64;   // kQ: the quadrant's tokens
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t ring0 = smem_addr(smem);
  const uint32_t la_s = ring0 + kStages * kStageBytes, up_s = la_s + C::kLaBytes;
  const uint32_t bars = ring0 + C::kBarOff;   // full[kStages], empty[kStages], epi_full, epi_empty
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t epi_full = bars + 16 * kStages, epi_empty = epi_full + 8;

  init_ring_bars<kStages>(bars, 16);   // one arrive per consumer warp: all four warpgroups read every stage

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Registers move from the producers to the consumers (setmaxnreg), within what the CTA holds: 96 a thread x 640
  // (the launch bounds' cap). The producers at 24 free 72 x 128 = 9216, so the consumers can rise to 112 (16 x 512 =
  // 8192). The first version asked for 120 (24 x 512 = 12288) and waited forever: its first GPU run hung.
  if (warp >= 16) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (warp == 16 && lane == 0) produce_ring<C>(&tm_w, &tm_a, &tm_ws, &tm_as, p, ring0, bars);
    else if (warp == 17 && lane == 0) produce_epi<C>(&tm_la, &tm_up, p, la_s, up_s, bars);
    return;
  }

  // ---------------- consumers: warpgroup q computes quadrant (channels 64 (q / 2), tokens 64 (q % 2)) of each tile
  asm volatile("setmaxnreg.inc.sync.aligned.u32 112;\n");
  grid_dependency_wait();
  const int q = warp / 4, qc = q / 2, qt = q % 2, wq = warp % 4, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const int row0 = 16 * wq + g, ch0 = 64 * qc + row0;
  const int KT = p.K / C::kTileK, chunks = p.R / C::kRank;
  T* out_s = reinterpret_cast<T*>(smem + kStages * kStageBytes + C::kEpiBytes + q * (kQ * C::kOutStride * 2));
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  float acc[kQ / 2], isum[kQ / 2];
  int it = 0, ec = 0;

  for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const int m0 = (tile % p.num_m_tiles) * C::kTok, n0 = (tile / p.num_m_tiles) * C::kCh;
#pragma unroll
    for (int i = 0; i < kQ / 2; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < KT; ++kt, ++it) {
      const int s = it % kStages;
      mbar_wait(full_bar(s), (it / kStages) & 1);
      const uint32_t st = ring0 + s * kStageBytes;
      // this quadrant's 64 weight rows and 64 token rows: whole 1024-byte swizzle atoms into the stage
      const uint64_t da = desc_sw128(st + qc * 64 * C::kTileK), db = desc_sw128(st + C::kABytes + qt * 64 * C::kTileK);
#pragma unroll
      for (int j = 0; j < 2; ++j) {   // the stage's two 64-k groups, in k order
        wgmma_fence();
        wgmma_tile<kQ, 0>(isum, da + 4 * j, db + 4 * j);
        wgmma_tile<kQ, 1>(isum, da + 4 * j + 2, db + 4 * j + 2);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(isum);
        const float w0 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0) * 4);
        const float w1 = lds_f32(st + C::kWsOff + (j * C::kCh + ch0 + 8) * 4);
        fold_group<kQ, 2>(acc, isum, w0, w1, st + C::kAsOff + (j * C::kTok + kQ * qt + 4 * t) * 4);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar(s));
    }

    // ---------------- epilogue (kernel 2's, on the quadrant): bias, low rank in rank order, one rounding ----------
    add_bias<T, kQ>(acc, bias, n0 + ch0);
    for (int c = 0; c < chunks; ++c, ++ec) {
      mbar_wait(epi_full, ec & 1);
      // the quadrant's token rows start 64 rows (8 KB: whole swizzle atoms) into lora_act
      lora_fma_chunk<T, kQ, C::kRank>(acc, la_s + qt * kQ * 128, up_s + ch0 * C::kRank * 2, t);
      __syncwarp();
      if (lane == 0) mbar_arrive(epi_empty);
    }
    store_tile<T, kQ, C::kOutStride>(acc, out_s, out, row0, t, tid, 1 + q, m0 + kQ * qt, n0 + 64 * qc, p.M, p.N);
  }
#endif
}
