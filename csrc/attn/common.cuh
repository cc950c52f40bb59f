// Shared device helpers of csrc/attn: 16-bit loads/stores by dtype code, warp reductions, KV4 quantization.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dcc_attn {

constexpr float kLog2e = 1.4426950408889634f;

// Loads of what earlier kernels wrote go through L2 only (ld.global.cg): with PDL (../common/pdl.cuh) a kernel
// runs while the one before it writes, so L1 may hold a line from before the write (a CUDA graph of these kernels
// gave wrong values through the L1 paths on an H100); every such value here is read once or twice per CTA anyway.
__device__ __forceinline__ float load16(const void* p, long long i, int dt) {
  const unsigned short bits = __ldcg(static_cast<const unsigned short*>(p) + i);
  return dt == 0 ? __half2float(__ushort_as_half(bits)) : __bfloat162float(__ushort_as_bfloat16(bits));
}

__device__ __forceinline__ float loadx(const void* p, long long i, int dt) {
  return dt == 2 ? __ldcg(static_cast<const float*>(p) + i) : load16(p, i, dt);
}

__device__ __forceinline__ void storex(void* p, long long i, float v, int dt) {
  if (dt == 0) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (dt == 1) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ float round_f16(float v) { return __half2float(__float2half_rn(v)); }

template <int W>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// dcc's quant_kv (ir/actquant.fake_quantize_kv) for 4 bits, step by step in float32 with explicit roundings (no
// contraction): scale = fp16(rng / 15), zero = fp16((-15 lo) / rng), code = rni(x * rcp_rn(scale) + zero),
// saturated to [0, 255], & 0xF. A flat vector (rng 0) is stored as code 0, scale 1, zero -lo (reads back lo).
struct Kv4Params {
  float inv, zero;
  __half scale, zero16;
};

__device__ __forceinline__ Kv4Params kv4_params(float lo, float hi) {
  Kv4Params p;
  const float rng = hi - lo;
  if (rng == 0.f) {
    p.inv = 0.f;
    p.zero = -lo;
    p.scale = __float2half_rn(1.f);
    p.zero16 = __float2half_rn(-lo);
    return p;
  }
  p.scale = __float2half_rn(__fdiv_rn(rng, 15.f));
  p.zero16 = __float2half_rn(__fdiv_rn(__fmul_rn(-15.f, lo), rng));
  p.inv = __frcp_rn(__half2float(p.scale));
  p.zero = __half2float(p.zero16);
  return p;
}

__device__ __forceinline__ unsigned kv4_code(float x16, const Kv4Params& p) {
  if (p.inv == 0.f) return 0u;
  float q = rintf(__fadd_rn(__fmul_rn(x16, p.inv), p.zero));   // rni: half to even, as cvt.rni
  q = fminf(fmaxf(q, 0.f), 255.f);                              // .sat.u8
  return static_cast<unsigned>(q) & 0xFu;
}

// fp16((code - zero) * scale), as the reference reads the cache back
__device__ __forceinline__ float kv4_value(unsigned code, float scale, float zero) {
  return round_f16(__fmul_rn(__fsub_rn(static_cast<float>(code), zero), scale));
}

// RoPE of one channel in transformers' rotate_half form, in float32: x cos + rot(x) sin with rot(x) = -partner in
// the first half and +partner in the second (partner: the channel D / 2 away), each product and the sum rounded (no
// FMA). The one definition every RoPE here uses (rope_write, the fused attention's q and K), so they give the same
// bits.
__device__ __forceinline__ float rope_channel(float x, float partner, float c, float s, bool first_half) {
  return __fadd_rn(__fmul_rn(x, c), __fmul_rn(first_half ? -partner : partner, s));
}

// One warp: head vector `src` of a decode step's qkv row into x[0..D) (shared memory), RoPE'd where `rotate`
// (rope_channel).
__device__ __forceinline__ void warp_rope(const void* qkv, long long src, const float* c, const float* s,
                                          bool rotate, int D, int in_dt, float* x, int lane) {
  const int half = D / 2;
  for (int i = lane; i < half; i += 32) {
    const float x1 = load16(qkv, src + i, in_dt), x2 = load16(qkv, src + i + half, in_dt);
    if (rotate) {
      x[i] = rope_channel(x1, x2, c[i], s[i], true);
      x[i + half] = rope_channel(x2, x1, c[i + half], s[i + half], false);
    } else {
      x[i] = x1;
      x[i + half] = x2;
    }
  }
  __syncwarp();
}

// The 16-bit bits of v rounded to dtype dt (0 fp16, 1 bf16), as storex stores them.
__device__ __forceinline__ uint16_t bits16(float v, int dt) {
  return dt == 0 ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// One warp: the K or V vector x[0..D) into cache slot `slot`: 16-bit (kv4 0, dtype in_dt) or KV4 (rounded to fp16
// first as quant_kv's x16, its range, then two codes per byte, the even channel low; scale and zero per slot).
// keep (shared memory, optional): the slot's bytes as stored, for a reader in the same CTA without a global round
// trip: 16-bit, keep[0..D) the values' bits; KV4, the D / 2 code bytes from keep's first byte, then keep[D] the
// scale's and keep[D + 1] the zero's fp16 bits. Visible to other warps after a __syncthreads().
__device__ __forceinline__ void warp_store_kv(float* x, int D, long long slot, void* cache, void* scale, void* zero,
                                              int in_dt, int kv4, int lane, uint16_t* keep = nullptr) {
  if (!kv4) {
    for (int i = lane; i < D; i += 32) {
      storex(cache, slot * D + i, x[i], in_dt);
      if (keep != nullptr) keep[i] = bits16(x[i], in_dt);
    }
    return;
  }
  float lo = INFINITY, hi = -INFINITY;
  for (int i = lane; i < D; i += 32) {
    const float v = round_f16(x[i]);
    x[i] = v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  __syncwarp();
  const Kv4Params prm = kv4_params(lo, hi);
  uint8_t* codes = static_cast<uint8_t*>(cache);
  const int half = D / 2;
  for (int j = lane; j < half; j += 32) {
    const unsigned c0 = kv4_code(x[2 * j], prm), c1 = kv4_code(x[2 * j + 1], prm);
    codes[slot * half + j] = static_cast<uint8_t>(c0 | (c1 << 4));
    if (keep != nullptr) reinterpret_cast<uint8_t*>(keep)[j] = static_cast<uint8_t>(c0 | (c1 << 4));
  }
  if (lane == 0) {
    static_cast<__half*>(scale)[slot] = prm.scale;
    static_cast<__half*>(zero)[slot] = prm.zero16;
    if (keep != nullptr) {
      keep[D] = __half_as_ushort(prm.scale);
      keep[D + 1] = __half_as_ushort(prm.zero16);
    }
  }
}

// One warp: KV4 slot `slot` read back into dst[0..D) as fp16, fp16((code - zero) * scale) per channel (kv4_value),
// which is the reference's kv4_dequantize. Where the warp has just written the slot (warp_store_kv), call it after a
// __syncwarp(): the codes, scale and zero other lanes stored are then visible to every lane.
__device__ __forceinline__ void warp_load_kv4(const void* cache, const void* scale, const void* zero, long long slot,
                                              int D, __half* dst, int lane) {
  const int half = D / 2;
  const uint8_t* codes = static_cast<const uint8_t*>(cache) + slot * half;
  const float sc = __half2float(static_cast<const __half*>(scale)[slot]);
  const float ze = __half2float(static_cast<const __half*>(zero)[slot]);
  for (int j = lane; j < half; j += 32) {
    const unsigned byte = codes[j];   // the even channel in the low nibble
    dst[2 * j] = __float2half_rn(kv4_value(byte & 0xFu, sc, ze));   // exact: kv4_value is an fp16 value already
    dst[2 * j + 1] = __float2half_rn(kv4_value(byte >> 4, sc, ze));
  }
}

}  // namespace dcc_attn
