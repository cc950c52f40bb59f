// PTX wrappers for Hopper (sm_90) mbarriers, bulk copies, thread-block clusters and programmatic dependent launch,
// shared by the wgmma kernel (gemm_wgmma.cu) and the cluster GEMV kernel (gemm_gemv.cu). Only included from device
// code compiled for sm_90 or later (guarded by the includer).
#pragma once

#include <cstdint>

namespace dcc_w4a8 {
namespace sm90 {

// ---- mbarriers and bulk copies (addresses: shared::cta) ----
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
// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// 1D bulk copy global -> shared (16-byte aligned, size a multiple of 16), completing on an mbarrier.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// The same copy written to the same shared-memory offset (and signalled on the mbarrier at the same offset) in
// every CTA of the cluster whose rank bit is set in `mask`. Only built for sm_90a (kMulticast; ptxas advises
// against it on plain sm_90), where callers fall back to one copy per CTA.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kMulticast = true;
#else
constexpr bool kMulticast = false;
#endif
__device__ __forceinline__ void bulk_load_multicast(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                                    uint16_t mask) {
  if constexpr (kMulticast)
    asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], "
      "%4;\n" :: "r"(dst), "l"(src), "r"(bytes), "r"(bar), "h"(mask) : "memory");
}

// ldmatrix .x4 (four 8x8 b16 matrices) from a shared::cta address.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// ldmatrix .x2 (two 8x8 b16 matrices; lanes 0-15 give the row addresses).
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// ---- programmatic dependent launch ----
// Wait until the grids this one depends on have completed and their memory is visible (a no-op when the launch
// was not programmatic).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// Allow the dependent grid to launch once every CTA of this grid has executed this (or exited).
__device__ __forceinline__ void grid_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// ---- clusters (split-K across the CTAs of a cluster, reduced through distributed shared memory) ----
// Every thread of every CTA of the cluster arrives (release: its shared-memory writes become visible to the
// cluster) and waits (acquire). Not .aligned: threads may reach it at different times.
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// The two halves of a cluster barrier, for work between them (each thread alternates arrive and wait). A relaxed
// arrive at the start and its wait before the first remote access guarantee that every CTA of the cluster runs
// (its shared memory exists) without stalling anyone at the start.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;\n" ::: "memory"); }
// A whole cluster barrier whose arrive is relaxed: it orders nothing this thread wrote, and unlike a release arrive
// it does not wait for the thread's memory operations in flight (at the start of a kernel, a weight ring: 2 us; at
// its end, the outputs' global stores). For "my mbarriers are initialised" (after fence_barrier_init, which
// orders the init) and "I am done reading your shared memory" (once the values read have been used).
__device__ __forceinline__ void cluster_sync_relaxed() {
  cluster_arrive_relaxed();
  cluster_wait();
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
__device__ __forceinline__ int4 ld_cluster128(uint32_t addr) {
  int4 v;
  asm volatile("ld.shared::cluster.v4.s32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_cluster128(uint32_t addr, int4 v) {
  asm volatile("st.shared::cluster.v4.s32 [%0], {%1, %2, %3, %4};\n" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w) : "memory");
}
__device__ __forceinline__ void st_cluster32(uint32_t addr, int v) {
  asm volatile("st.shared::cluster.s32 [%0], %1;\n" :: "r"(addr), "r"(v) : "memory");
}

}  // namespace sm90
}  // namespace dcc_w4a8
