// Device helpers shared by the W4A4 kernels: the 16-bit types (fp16 / bf16) as one trait, the mma.sync s8 wrapper,
// and the fp32 steps of the numerics, written with explicit _rn intrinsics so that nvcc cannot contract or reorder
// them (csrc/w4a4/DESIGN.md; dcc/targets/nunchaku/cuda_numerics.py does the same steps on the CPU).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w4a4.h"

namespace dcc_w4a4 {

template <class T>
struct Sixteen;

template <>
struct Sixteen<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }        // exact
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }   // one RNE
};

template <>
struct Sixteen<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// A 16-bit value read as float (raw bits through a 16-bit load: the tensors are plain uint16 to the host side).
template <class T>
__device__ __forceinline__ float ld16f(const T* p) {
  return Sixteen<T>::to_f(*p);
}

// d += a (16x32 s8, row) * b (32x8 s8, col) with s32 accumulation: exact integer arithmetic, any order gives the
// same bits. 4-bit codes widened to one byte each are valid s8 operands, signed ([-8, 7]) and unsigned ([0, 15])
// alike, so the unsigned activations of an after-GELU layer need no u8 variant.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 64-k group folded into the fp32 accumulator: s = fl32(ascale * wscale) (the product of two 16-bit values is
// exact in fp32 unless it under- or overflows), then acc = fma(float(psum), s, acc) with one rounding; float(psum)
// is exact (|psum| <= 64 * 15 * 8 < 2^24). A faster kernel keeps this step and this order (groups in k order, acc
// from +0) and stays bit-identical.
__device__ __forceinline__ float group_step(int psum, float as, float ws, float acc) {
  return __fmaf_rn(__int2float_rn(psum), __fmul_rn(as, ws), acc);
}

}  // namespace dcc_w4a4
