// Device helpers of the Hopper W4A8 GEMM (included by wgmma_kernel.cuh where the sm_90a body is compiled): the
// weight unpack into wgmma A fragments and the epilogue (QServe's order) of the split-K paths.
#pragma once

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

// One output in QServe's order (common.cuh, qserve_epilogue_f): s1f/szf channel scales, as/am token scale and sum,
// all float values of fp16 numbers.
template <int kGroup>
__device__ __forceinline__ __half qserve_out(int psum, float s1f, float szf, float as, float am) {
  return __float2half_rn(qserve_epilogue_f(__int2float_rn(psum), s1f, szf, as, am, kGroup == 0));
}

// Token scales a thread loads ahead (kTok <= 16), per array.
__host__ __device__ constexpr int pre_toks(int tok) { return tok <= 16 ? tok / 4 : 1; }

// Outputs of one thread's fragments straight to global memory (the split-K paths, where one CTA writes only some
// warps' channels): the same rounding as the staged epilogue in the kernel. c0 = the channel of row g of the lo
// slab; the thread's rows are c0 + 8rp + 16h, its tokens m0 + 8i + 2t + e. kTok <= 16: their scales were loaded
// when the tile started (s1h/szh[rp + 2h], ash/amh[2i + e]); larger tiles load them here.

template <int kGroup, int kTok>
__device__ __forceinline__ void epilogue_direct(const int (&acc_lo)[kTok / 2], const int (&acc_hi)[kTok / 2],
                                                const WgParams& p, int m0, int c0, int t, const __half (&s1h)[4],
                                                const __half (&szh)[4], const __half (&ash)[pre_toks(kTok)],
                                                const __half (&amh)[pre_toks(kTok)]) {
  float s1f[4], szf[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {   // q = rp + 2h
    const int c = c0 + 8 * (q & 1) + 16 * (q >> 1);
    s1f[q] = __half2float(kTok <= 16 ? s1h[q] : p.s1[c]);
    szf[q] = kGroup == 0 ? __half2float(kTok <= 16 ? szh[q] : p.szeros[c]) : 0.f;
  }
  if constexpr (kTok > 16) {   // one output at a time (registers: a staged array of 128 outputs would spill)
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
          orow[c0 + 8 * rp + 16 * h] = qserve_out<kGroup>(ps, s1f[q], szf[q], as, am);
        }
      }
    }
    return;
  } else {
    // Every output first, with no branch between them (so that the outputs' dependency chains interleave: a branch
    // per output made this a chain of 16 latencies at one warp per scheduler), then the stores.
    constexpr int kOut = kTok / 8 * 2 * 4;   // outputs per thread: (i, e, q) -> (2i + e) * 4 + q
    __half o[kOut];
#pragma unroll
    for (int j = 0; j < kTok / 4; ++j) {   // token m0 + 8(j/2) + 2t + j%2: accumulators 4(j/2) + 2rp + j%2
      const float as = __half2float(ash[j]), am = kGroup == 0 ? __half2float(amh[j]) : 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int a = 4 * (j / 2) + 2 * (q & 1) + j % 2;
        const int ps = q >> 1 ? acc_hi[a] : acc_lo[a];
        o[j * 4 + q] = qserve_out<kGroup>(ps, s1f[q], szf[q], as, am);
      }
    }
#pragma unroll
    for (int j = 0; j < kTok / 4; ++j) {
      const int m = m0 + 8 * (j / 2) + 2 * t + j % 2;
      if (m >= p.M) continue;
      __half* orow = p.out + static_cast<size_t>(m) * p.N + c0;
#pragma unroll
      for (int q = 0; q < 4; ++q) orow[8 * (q & 1) + 16 * (q >> 1)] = o[j * 4 + q];
    }
  }
}
