// PTX wrappers for the Hopper (sm_90a) W4A16 GEMM (gemm_wgmma.cu): mbarriers, bulk and 2D TMA copies, wgmma with the
// weights as the A operand in registers and the activations as B in shared memory (f16 / bf16 -> f32), named and
// cluster barriers, distributed shared memory. Written after csrc/w4a8's sm90_ptx.cuh / wgmma_ptx.cuh (dcc's own);
// kept here so that csrc/w4a16 builds on its own. Only included where __CUDA_ARCH_FEAT_SM90_ALL is defined.
#pragma once

#include <cstdint>

namespace dcc_w4a16 {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers (shared::cta addresses) ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Wait until the phase of parity `parity` has completed (parity 1 of a fresh barrier counts as completed, so a
// producer's first pass over an empty ring does not wait).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// ---- copies global -> shared, completing on an mbarrier (tx bytes) ----
// 1D bulk copy (16-byte aligned, size a multiple of 16).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// 2D tiled TMA load of the tensor map's box at (c0 innermost, c1).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      :: "r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar) : "memory");
}

// ---- shared memory ----
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ unsigned short lds16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ float4 lds_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts_f2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" :: "r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void sts_f1(uint32_t addr, float a) {
  asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(addr), "f"(a) : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// ---- clusters: split-K partials summed over distributed shared memory ----
// Every thread of every CTA of the cluster arrives (release: its shared-memory writes become visible to the
// cluster) and waits (acquire). A kernel launched without a cluster is a cluster of one CTA.
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The shared::cluster address of `addr` (a shared::cta address of this CTA) in the CTA of rank `rank`.
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
  return v;
}

// ---- wgmma ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}

// Shared-memory matrix descriptor: K-major operand with 128-byte swizzle, 8-row groups 1024 bytes apart (SBO), LBO
// unused for swizzled K-major (1), base offset 0 (the tile is 1024-byte aligned; a k16 slice inside the 128-byte row
// advances the start address by its 32 bytes).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// d[64 x N f32] += A[64 x 16, registers] * B[16 x N, smem K-major] ("RS" form: scale-d 1, A and B not negated, B not
// transposed). A per warp w = the mma.sync m16n8k16 A fragment of rows 16w..16w+15: a0 (row g, k 2t, 2t+1),
// a1 (g + 8, 2t..), a2 (g, 8 + 2t..), a3 (g + 8, 8 + 2t..), g = lane / 4, t = lane % 4. d[4i + r] = (row 16w + g +
// 8 (r / 2), column 8i + 2t + r % 2).
// The accumulators' operand list, "%0, %1, ...", 8 at a time, and their "+f"(d[i]) constraints, to write the three
// wgmma shapes below once (the operand count of an asm statement cannot be a parameter).
#define DCC_R0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define DCC_R1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define DCC_R2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define DCC_R3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define DCC_R4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define DCC_R5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define DCC_R6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define DCC_R7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define DCC_R8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define DCC_R9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define DCC_R10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define DCC_R11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define DCC_R12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define DCC_R13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define DCC_R14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define DCC_R15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define DCC_R32 DCC_R0 ", " DCC_R1 ", " DCC_R2 ", " DCC_R3
#define DCC_R64 DCC_R32 ", " DCC_R4 ", " DCC_R5 ", " DCC_R6 ", " DCC_R7
#define DCC_R128 \
  DCC_R64 ", " DCC_R8 ", " DCC_R9 ", " DCC_R10 ", " DCC_R11 ", " DCC_R12 ", " DCC_R13 ", " DCC_R14 ", " DCC_R15
#define DCC_F8(o)                                                                                \
  "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), \
      "+f"(d[o + 6]), "+f"(d[o + 7])
#define DCC_F32 DCC_F8(0), DCC_F8(8), DCC_F8(16), DCC_F8(24)
#define DCC_F64 DCC_F32, DCC_F8(32), DCC_F8(40), DCC_F8(48), DCC_F8(56)
#define DCC_F128 \
  DCC_F64, DCC_F8(64), DCC_F8(72), DCC_F8(80), DCC_F8(88), DCC_F8(96), DCC_F8(104), DCC_F8(112), DCC_F8(120)
// wgmma_m64n<N>k16_<TY>(d, a, desc); A_OPS: the A registers and the descriptor, numbered after the N / 2 accumulators
#define DCC_WGMMA_RS(N, TY, REGS, FLIST, A_OPS)                                                            \
  __device__ __forceinline__ void wgmma_m64n##N##k16_##TY(float (&d)[N / 2], const uint32_t (&a)[4],        \
                                                          uint64_t desc) {                                  \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TY "." #TY " {" REGS "}, " A_OPS         \
                 ", 1, 1, 1, 0;\n"                                                                          \
                 : FLIST                                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                 \
  }
DCC_WGMMA_RS(64, f16, DCC_R32, DCC_F32, "{%32, %33, %34, %35}, %36")
DCC_WGMMA_RS(64, bf16, DCC_R32, DCC_F32, "{%32, %33, %34, %35}, %36")
DCC_WGMMA_RS(128, f16, DCC_R64, DCC_F64, "{%64, %65, %66, %67}, %68")
DCC_WGMMA_RS(128, bf16, DCC_R64, DCC_F64, "{%64, %65, %66, %67}, %68")
DCC_WGMMA_RS(256, f16, DCC_R128, DCC_F128, "{%128, %129, %130, %131}, %132")
DCC_WGMMA_RS(256, bf16, DCC_R128, DCC_F128, "{%128, %129, %130, %131}, %132")
#undef DCC_WGMMA_RS
#undef DCC_R0
#undef DCC_R1
#undef DCC_R2
#undef DCC_R3
#undef DCC_R4
#undef DCC_R5
#undef DCC_R6
#undef DCC_R7
#undef DCC_R8
#undef DCC_R9
#undef DCC_R10
#undef DCC_R11
#undef DCC_R12
#undef DCC_R13
#undef DCC_R14
#undef DCC_R15
#undef DCC_R32
#undef DCC_R64
#undef DCC_R128
#undef DCC_F8
#undef DCC_F32
#undef DCC_F64
#undef DCC_F128
// Dispatch on the element type and the token tile (the wgmma N) at compile time.
template <bool kBf16, int kTok>
__device__ __forceinline__ void wgmma_rs(float (&d)[kTok / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(kTok == 64 || kTok == 128 || kTok == 256, "token tile");
  if constexpr (kTok == 64) {
    if constexpr (kBf16) wgmma_m64n64k16_bf16(d, a, desc);
    else wgmma_m64n64k16_f16(d, a, desc);
  } else if constexpr (kTok == 128) {
    if constexpr (kBf16) wgmma_m64n128k16_bf16(d, a, desc);
    else wgmma_m64n128k16_f16(d, a, desc);
  } else {
    if constexpr (kBf16) wgmma_m64n256k16_bf16(d, a, desc);
    else wgmma_m64n256k16_f16(d, a, desc);
  }
}

}  // namespace sm90
}  // namespace dcc_w4a16
