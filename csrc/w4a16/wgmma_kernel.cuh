// Device side of the Hopper W4A16 GEMM (included by gemm_wgmma.cu only, inside namespace dcc_w4a16 and its
// anonymous namespace; the design is described at the top of gemm_wgmma.cu): the tile and ring configurations and the
// kernel (producer thread, two consumer warpgroups, split-K epilogue over distributed shared memory).
#pragma once

constexpr int kThreads = 384;     // warpgroup 0-1: consumers, 2: producer
constexpr int kTileN = 128;       // channels per CTA
constexpr int kTileK = 64;        // k per stage: 128 bytes of 16-bit activations per token row
constexpr int kPartStride = kTileN + 4;   // floats per token row of the fp32 partial tile (conflict-free stores)

struct WgParams {
  const uint8_t* scales;    // [Kg, N] 16-bit
  const uint8_t* szeros;    // [Kg, N] 16-bit
  const void* bias;         // [N] 16-bit or null
  void* out;                // [M, N] 16-bit
  int M, N, K, group, mtiles, S, kt_split;   // kt_split: k stages per split
  int rotate;   // 1: each channel tile starts its k loop at its own stage (spread over the split), wrapping around
  // global split-K (S > 1, no cluster): partials [tiles][S][kTok][kTileN] fp32 and a counter per tile, zero between
  // launches (the last CTA of a tile resets it)
  float* part;
  unsigned* counters;
};

template <int kTok, int kStages>
struct Cfg {
  static constexpr int kActBytes = kTok * kTileK * 2;
  static constexpr int kWBytes = (kTileN / 4) * kTileK * 2;   // 32 qweight rows x 128 bytes
  static constexpr int kScaleBytes = 1024;                    // up to 2 groups x (256 B scales + 256 B zeros)
  static constexpr int kStageBytes = kActBytes + kWBytes + kScaleBytes;   // multiple of 1024: SW128 boxes aligned
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kPartBytes = kTok * kPartStride * 4;
  static_assert(kRingBytes >= kPartBytes, "the partial tile reuses the ring");
  static constexpr int kSmemBytes = 1024 + kRingBytes + 2 * kStages * 8;
};
// Ring depth: deeper rings (9 / 14 stages, 194 / 182 KB) measured no faster on the H100 (DESIGN.md), so the
// stage time is not set by the weight bytes in flight.
using CfgLarge = Cfg<128, 6>;   // 129 KB ring
using CfgMid = Cfg<64, 8>;      // 106 KB ring
// 256-token tiles: half the CTAs of CfgLarge, taken where 128-token tiles would take a second wave of SMs and
// 256-token ones fit one (gemm_wgmma_tile: 14336 x 4096 at M = 256, 224 tiles against 112); 128 accumulators a thread.
using CfgWide = Cfg<256, 4>;    // 148 KB ring

// kSets: A register sets, i.e. stage groups of wgmmas in flight while the next stage is dequantised (2: the previous
// stage's group must retire before the next stage is unpacked; 3: two groups in flight).
template <bool kBf16, int kTok, int kStages, int kSets>
__global__ void __launch_bounds__(kThreads, 1) w4a16_wgmma_kernel(const __grid_constant__ CUtensorMap tx,
                                                                  const __grid_constant__ CUtensorMap tw,
                                                                  const WgParams p) {
#if defined(DCC_W4A16_WGMMA_DEVICE)
  using namespace sm90;
  using C = Cfg<kTok, kStages>;
  using T = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  using H = Half2Of<T>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t ring = smem_addr(smem);
  const uint32_t full0 = ring + C::kRingBytes, empty0 = full0 + 8 * kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);   // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int m0 = (blockIdx.x % p.mtiles) * kTok, n0 = (blockIdx.x / p.mtiles) * kTileN;
  const int split = blockIdx.y, KT = p.kt_split, kt0 = split * KT;
  // rotate: channel tile j of J starts at stage j KT / J of its split, so that at any moment the CTAs that share a
  // token tile read different activation boxes rather than all the same one (the sum's order changes with it; each
  // tile's order is still fixed)
  const int rot = p.rotate ? static_cast<int>((static_cast<long long>(blockIdx.x / p.mtiles) * KT) /
                                              (p.N / kTileN)) : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (warp >= 8) {
    // ---------------- producer: one thread streams the split's k stages through the ring ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 8 && lane == 0) {
      const int groups = p.group == 32 ? 2 : 1;   // group rows a 64-k stage touches (G >= 64: the one it lies in)
      const uint32_t bytes = C::kActBytes + C::kWBytes + groups * 512;
      for (int it = 0; it < KT; ++it) {
        const int s = it % kStages;
        mbar_wait(empty0 + 8 * s, ((it / kStages) & 1) ^ 1);
        const uint32_t full = full0 + 8 * s, st = ring + s * C::kStageBytes;
        const int kr = it + rot, k0 = (kt0 + (kr >= KT ? kr - KT : kr)) * kTileK;
        mbar_arrive_expect_tx(full, bytes);   // the TMA boxes count in full, rows past M included
        tma_load_2d(st, &tx, k0, m0, full);
        tma_load_2d(st + C::kActBytes, &tw, k0, n0 / 4, full);
        for (int gi = 0; gi < groups; ++gi) {
          const size_t row = static_cast<size_t>(k0 / p.group + gi) * p.N + n0;
          bulk_load(st + C::kActBytes + C::kWBytes + gi * 512, p.scales + 2 * row, 256, full);
          bulk_load(st + C::kActBytes + C::kWBytes + gi * 512 + 256, p.szeros + 2 * row, 256, full);
        }
      }
    }
    // the consumers' two cluster barriers (cluster split-K): every thread of the cluster takes part
    if (p.S > 1 && p.part == nullptr) {
      cluster_sync_all();
      cluster_sync_all();
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4;
  // this thread's channels (CTA-local): the A fragment's rows g and g + 8 of warp wq's 16
  const int c0 = wg * 64 + wq * 16 + g, c1 = c0 + 8;
  // word t of the 16-byte chunk (channel c, 32-run h) in the SW128 weight box: qweight row c / 4 is a 128-byte line
  // whose chunk 2 (c % 4) + h sits at chunk index (2 (c % 4) + h) ^ (line % 8)
  auto waddr = [&](int c, int h) -> uint32_t {
    const int line = c >> 2;
    return line * 128 + (((2 * (c & 3) + h) ^ (line & 7)) << 4) + 4 * t;
  };
  const uint32_t wa00 = waddr(c0, 0), wa01 = waddr(c0, 1), wa10 = waddr(c1, 0), wa11 = waddr(c1, 1);
  float acc[kTok / 2];
#pragma unroll
  for (int i = 0; i < kTok / 2; ++i) acc[i] = 0.f;
  static_assert(kSets == 2 || kSets == 3, "register sets");
  uint32_t fr[kSets][4][4];   // [register set][k16 step][A fragment]

  auto stage = [&](auto set_c, int it) {
    constexpr int set = decltype(set_c)::value;
    const int s = it % kStages;
    mbar_wait(full0 + 8 * s, (it / kStages) & 1);
    const uint32_t st = ring + s * C::kStageBytes, wt = st + C::kActBytes, sc = wt + C::kWBytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // the 32-run's group row in the stage's scale area (G = 32: one per run; else the stage's one)
      const uint32_t gs = sc + (p.group == 32 ? h * 512 : 0);
      const auto s0 = H::broadcast(H::from_bits(lds16(gs + 2 * c0)));
      const auto z0 = H::broadcast(H::from_bits(lds16(gs + 256 + 2 * c0)));
      const auto s1 = H::broadcast(H::from_bits(lds16(gs + 2 * c1)));
      const auto z1 = H::broadcast(H::from_bits(lds16(gs + 256 + 2 * c1)));
      uint32_t q0[4], q1[4];
      dequant_word<T>(lds32(wt + (h ? wa01 : wa00)), s0, z0, q0);
      dequant_word<T>(lds32(wt + (h ? wa11 : wa10)), s1, z1, q1);
#pragma unroll
      for (int cl = 0; cl < 2; ++cl) {   // k16 step 2h + cl: pairs i = 2cl (k 2t) and 2cl + 1 (k 8 + 2t)
        fr[set][2 * h + cl][0] = q0[2 * cl];
        fr[set][2 * h + cl][1] = q1[2 * cl];
        fr[set][2 * h + cl][2] = q0[2 * cl + 1];
        fr[set][2 * h + cl][3] = q1[2 * cl + 1];
      }
    }
    const uint64_t desc = desc_sw128(st);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_rs<kBf16, kTok>(acc, fr[set][j], desc + ((j * 32) >> 4));
    wgmma_commit();
    // the group of stage it - (kSets - 1) retired: its register set (the next stage's) and its ring slot are free
    wgmma_wait<kSets - 1>();
    if (it >= kSets - 1 && lane == 0) mbar_arrive(empty0 + 8 * ((it - (kSets - 1)) % kStages));
  };
  int it = 0;
  for (; it + kSets <= KT; it += kSets) {   // unrolled by kSets: the register set is a constant
    stage(std::integral_constant<int, 0>(), it);
    stage(std::integral_constant<int, 1>(), it + 1);
    if constexpr (kSets == 3) stage(std::integral_constant<int, 2 % kSets>(), it + 2);
  }
  if (it < KT) stage(std::integral_constant<int, 0>(), it);
  if (it + 1 < KT) stage(std::integral_constant<int, 1>(), it + 1);
  wgmma_wait<0>();

  // ---------------- epilogue ----------------
  // Every stage was consumed and its wgmmas retired once both warpgroups pass this barrier: the ring holds the fp32
  // partial tile P[token][channel] (row stride kPartStride floats). d[4i + r] = (channel 16 wq + g + 8 (r / 2),
  // token 8i + 2t + r % 2).
  named_bar_sync(1, 256);
#pragma unroll
  for (int i = 0; i < kTok / 8; ++i) {
    const int tok = 8 * i + 2 * t;
    sts_f1(ring + (tok * kPartStride + c0) * 4, acc[4 * i]);
    sts_f1(ring + ((tok + 1) * kPartStride + c0) * 4, acc[4 * i + 1]);
    sts_f1(ring + (tok * kPartStride + c1) * 4, acc[4 * i + 2]);
    sts_f1(ring + ((tok + 1) * kPartStride + c1) * 4, acc[4 * i + 3]);
  }
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  // one output row of 4 channels: bias in fp32, one rounding, 8 bytes a store
  auto store4 = [&](int row, int c, float4 v) {
    const int m = m0 + row;
    if (m >= p.M) return;
    if (bias != nullptr) {
      v.x += H::to_float(bias[n0 + c]); v.y += H::to_float(bias[n0 + c + 1]);
      v.z += H::to_float(bias[n0 + c + 2]); v.w += H::to_float(bias[n0 + c + 3]);
    }
    const typename H::T2 lo(H::from_float(v.x), H::from_float(v.y)), hi(H::from_float(v.z), H::from_float(v.w));
    uint2 pk;
    pk.x = as_bits(lo);
    pk.y = as_bits(hi);
    *reinterpret_cast<uint2*>(out + static_cast<size_t>(m) * p.N + n0 + c) = pk;
  };
  if (p.part != nullptr) {
    // Global split-K: every CTA of the tile publishes its partial; the last to arrive (the counter) sums the S
    // partials in split order -- the same order whichever CTA is last: deterministic -- and resets the counter.
    named_bar_sync(1, 256);
    constexpr int kQuads = kTok * (kTileN / 4);
    float4* mine = reinterpret_cast<float4*>(p.part) + (static_cast<size_t>(blockIdx.x) * p.S + split) * kQuads;
    for (int e = threadIdx.x; e < kQuads; e += 256)
      __stcg(mine + e, lds_f4(ring + ((e / (kTileN / 4)) * kPartStride + 4 * (e % (kTileN / 4))) * 4));
    __threadfence();   // the partial is visible device-wide before the counter says so
    named_bar_sync(1, 256);
    __shared__ unsigned arrived;
    if (threadIdx.x == 0) arrived = atomicAdd(p.counters + blockIdx.x, 1u);
    named_bar_sync(1, 256);
    if (arrived != static_cast<unsigned>(p.S - 1)) return;
    __threadfence();
    const float4* all = reinterpret_cast<const float4*>(p.part) + static_cast<size_t>(blockIdx.x) * p.S * kQuads;
    for (int e = threadIdx.x; e < kQuads; e += 256) {
      float4 v = __ldcg(all + e);
      for (int z = 1; z < p.S; ++z) {
        const float4 w = __ldcg(all + static_cast<size_t>(z) * kQuads + e);
        v.x += w.x; v.y += w.y; v.z += w.z; v.w += w.w;
      }
      store4(e / (kTileN / 4), 4 * (e % (kTileN / 4)), v);
    }
    if (threadIdx.x == 0) p.counters[blockIdx.x] = 0u;
    return;
  }
  if (p.S > 1) cluster_sync_all();
  else named_bar_sync(1, 256);
  const int rows = kTok / p.S, row0 = split * rows;
  for (int e = threadIdx.x; e < rows * (kTileN / 4); e += 256) {
    const int row = row0 + e / (kTileN / 4), c = 4 * (e % (kTileN / 4));
    const uint32_t off = ring + (row * kPartStride + c) * 4;
    float4 v = p.S > 1 ? ld_cluster_f4(mapa(off, 0)) : lds_f4(off);
    for (int z = 1; z < p.S; ++z) {   // the splits' partials in rank order
      const float4 w = ld_cluster_f4(mapa(off, z));
      v.x += w.x; v.y += w.y; v.z += w.z; v.w += w.w;
    }
    store4(row, c, v);
  }
  if (p.S > 1) cluster_sync_all();   // the other CTAs have read this CTA's partials
#endif
}
