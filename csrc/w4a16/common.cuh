// W4A16 (TinyChat "v2" layout) device helpers shared by the GEMV/fused kernel and the dequantize kernel.
//
// Layout (dcc/targets/tinychat/layout.py is the spec): qweight int16 [N/4, K]. For output row n (n4 = n/4,
// r = n%4) and a 32-run of k starting at k0 = 64*kt + 32*h, the 8 int16 words
//     qweight[n4, 64*kt + 16*r + 8*h .. +8]        (16 bytes, 16-byte aligned)
// hold the 32 codes e[0..31] = q(n, k0 + 0..31) as word j = e[j] | e[8+j]<<4 | e[16+j]<<8 | e[24+j]<<12.
// Read as four uint32 u_j (u_j = word 2j | word 2j+1 << 16), nibbles i and i+4 of u_j hold the adjacent pair
// e[8i+2j], e[8i+2j+1]: (u_j >> 4i) & 0x000F000F put into the mantissa of a 16-bit float with a magic exponent
// gives that pair as a half2/bfloat162 (plus the magic value, subtracted exactly afterwards). So "pair p" of a
// chunk, p = 4i + j, covers k0 + 2p and k0 + 2p + 1: the 16 pairs come out in natural k order.
//
// Dequantisation is w = fma(q, s, sz) in the 16-bit type, one rounding, which is exactly what
// dcc.targets.tinychat.layout.decode_weight computes (rnd(q*s + sz), formed exactly then rounded once).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dcc_w4a16 {

template <typename T>
struct Half2Of;

template <>
struct Half2Of<__half> {
  using T2 = __half2;
  // 0x6400 = 1024.0 in fp16 (10 mantissa bits): 0x6400 | q == 1024 + q exactly for q in 0..15.
  static constexpr uint32_t kMagic = 0x64006400u;
  static __device__ __forceinline__ T2 magic() { return __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)); }
  static __device__ __forceinline__ T2 broadcast(__half v) { return __half2half2(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half from_bits(unsigned short u) { return __ushort_as_half(u); }
};

template <>
struct Half2Of<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // 0x4300 = 128.0 in bf16 (7 mantissa bits): 0x4300 | q == 128 + q exactly for q in 0..15.
  static constexpr uint32_t kMagic = 0x43004300u;
  static __device__ __forceinline__ T2 magic() {
    return __halves2bfloat162(__ushort_as_bfloat16(0x4300), __ushort_as_bfloat16(0x4300));
  }
  static __device__ __forceinline__ T2 broadcast(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_bits(unsigned short u) { return __ushort_as_bfloat16(u); }
};

template <typename T2>
__device__ __forceinline__ T2 bits_as(uint32_t u) {
  return *reinterpret_cast<T2*>(&u);
}

template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Pair 4i + j of a 16-byte chunk (j a compile-time constant, i may be a run-time value).
template <typename T>
__device__ __forceinline__ typename Half2Of<T>::T2 dequant_pair_ij(const uint4& chunk, int i, int j,
                                                                  typename Half2Of<T>::T2 s2,
                                                                  typename Half2Of<T>::T2 sz2) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  const uint32_t bits = ((word_of(chunk, j) >> (4 * i)) & 0x000F000Fu) | H::kMagic;
  const T2 q = __hsub2(bits_as<T2>(bits), H::magic());
  return __hfma2(q, s2, sz2);
}

// Pair p (0..15, a compile-time constant after unrolling) of a 16-byte chunk, dequantised: the two weights for
// k0 + 2p, k0 + 2p + 1, each rnd(q*s + sz).
template <typename T>
__device__ __forceinline__ typename Half2Of<T>::T2 dequant_pair(const uint4& chunk, int p, typename Half2Of<T>::T2 s2,
                                                               typename Half2Of<T>::T2 sz2) {
  using H = Half2Of<T>;
  using T2 = typename H::T2;
  const int i = p >> 2, j = p & 3;
  const uint32_t u = word_of(chunk, j);
  const uint32_t bits = ((u >> (4 * i)) & 0x000F000Fu) | H::kMagic;
  const T2 q = __hsub2(bits_as<T2>(bits), H::magic());  // exact: (magic + q) - magic
  return __hfma2(q, s2, sz2);                             // one rounding
}

// d = (a & B) | C in one LOP3 (ptxas otherwise splits an AND and an OR of two immediates into two instructions).
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(B), "n"(C));
  return d;
}

// The four pairs of one 32-bit word u_j of a chunk, dequantised: q[i] = pair 4i + j (k0 + 8i + 2j, k0 + 8i + 2j + 1),
// with fewer instructions than dequant_pair: one LOP3 per pair for the nibble extraction, and for fp16 one shift per
// word instead of three. fp16: nibbles 1 and 3 of a word are taken in place, (u & 0x00F000F0) | 0x6400 = 1024 + 16q,
// and q = (1024 + 16q) / 16 - 64 by one HFMA2 (every step exact: q is an integer 0..15); nibbles 0 and 2 as before,
// q = (1024 + q) - 1024. The weight is then the same single-rounding hfma2(q, s, sz) as dequant_pair: bit-identical
// results. Word j of a row's chunk is also what lane t = j of an mma / wgmma A fragment needs (pairs i = 0, 1: the
// first k16 step's columns 2t and 8 + 2t; i = 2, 3: the second's), gemm_wgmma.cu.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t u, typename Half2Of<T>::T2 s2, typename Half2Of<T>::T2 z2,
                                             uint32_t (&q)[4]);

template <>
__device__ __forceinline__ void dequant_word<__half>(uint32_t u, __half2 s2, __half2 z2, uint32_t (&q)[4]) {
  const __half2 magic = __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400));
  const __half2 sixteenth = __halves2half2(__ushort_as_half(0x2C00), __ushort_as_half(0x2C00));  // 1/16
  const __half2 m64 = __halves2half2(__ushort_as_half(0xD400), __ushort_as_half(0xD400));        // -64
  const uint32_t u8 = u >> 8;
  const __half2 q0 = __hsub2(bits_as<__half2>(and_or<0x000F000Fu, 0x64006400u>(u)), magic);
  const __half2 q1 = __hfma2(bits_as<__half2>(and_or<0x00F000F0u, 0x64006400u>(u)), sixteenth, m64);
  const __half2 q2 = __hsub2(bits_as<__half2>(and_or<0x000F000Fu, 0x64006400u>(u8)), magic);
  const __half2 q3 = __hfma2(bits_as<__half2>(and_or<0x00F000F0u, 0x64006400u>(u8)), sixteenth, m64);
  q[0] = as_bits(__hfma2(q0, s2, z2));
  q[1] = as_bits(__hfma2(q1, s2, z2));
  q[2] = as_bits(__hfma2(q2, s2, z2));
  q[3] = as_bits(__hfma2(q3, s2, z2));
}

template <>
__device__ __forceinline__ void dequant_word<__nv_bfloat16>(uint32_t u, __nv_bfloat162 s2, __nv_bfloat162 z2,
                                                            uint32_t (&q)[4]) {
  using H = Half2Of<__nv_bfloat16>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 v = __hsub2(bits_as<__nv_bfloat162>(and_or<0x000F000Fu, 0x43004300u>(u >> (4 * i))),
                                     H::magic());
    q[i] = as_bits(__hfma2(v, s2, z2));
  }
}

// All 16 pairs of a 16-byte chunk, dequantised (pair p = 4i + j as in dequant_pair) by dequant_word.
template <typename T>
__device__ __forceinline__ void dequant_chunk(const uint4& c, typename Half2Of<T>::T2 s2, typename Half2Of<T>::T2 z2,
                                              uint32_t (&w)[16]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t q[4];
    dequant_word<T>(word_of(c, j), s2, z2, q);
#pragma unroll
    for (int i = 0; i < 4; ++i) w[4 * i + j] = q[i];
  }
}

// 16-byte read-only load that does not allocate in L1 (the weights are read once).
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16-byte load of activations from L2 (ld.global.cg: L1 bypassed). The previous kernel writes them, and with PDL
// (../common/pdl.cuh) this kernel may already run while it does: the non-coherent or L1 paths could return a line
// cached before the write (measured on an H100: a chain of these kernels in a CUDA graph gave wrong sums when the
// activations were read through ld.global.nc), and L1 would gain little (a block reads each activation once).
__device__ __forceinline__ uint4 ld_act_u4(const void* p) {
  return __ldcg(reinterpret_cast<const uint4*>(p));
}

// 16-byte read-only load through L1: the benchmark-only variants in dev/cuda/w4a16 (plain launches) read their
// activations so, as they were measured.
__device__ __forceinline__ uint4 ld_cached_u4(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// D = A(16x16, row) * B(16x8, col) + D with fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

}  // namespace dcc_w4a16
