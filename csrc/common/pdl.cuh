// Programmatic dependent launch (PDL, sm_90): a kernel launched with the programmatic-stream-serialization attribute
// may start while the kernel before it in the stream is still running, once every CTA of that one has called
// launch_dependents() (or exited). Until its own wait() returns, it may only read memory that no kernel still in
// flight writes -- the weights, and what was written before the nearest kernel of the stream launched without PDL
// (that one started only once everything before it had completed; a decode step's KV cache slots and positions:
// csrc/attn/DESIGN.md) -- and prefetch anything into L2 (L2 is where global memory is coherent, so a prefetch can
// never make a later load stale); wait() returns once the previous grid has completed and its writes are visible.
// So a decode step's chain of small kernels overlaps each kernel's launch, prologue and first weight loads with the
// tail of the one before it (csrc/attn/DESIGN.md, "Overlapped launches").
//
// Rules kept by every kernel launched through launch():
//   * wait() is called in every CTA before its first read of an earlier kernel's output and before its first global
//     write (a kernel still in flight may read what this one would overwrite);
//   * launch_dependents() may be called anywhere; the kernels call it first thing, since a dependent that starts
//     early only waits in wait() and the SMs it takes are ones this grid has no CTA left to place on.
// On other GPUs, or with DCC_PDL=0, launch() is a plain launch and wait() / launch_dependents() do nothing.
// Shared by the families in csrc/ (included as "../common/pdl.cuh"; each family still builds on its own).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace dcc_pdl {

__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A hint that the 128-byte line holding p will be read soon: fetched into L2, nothing returned.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Lines [0, bytes) of p prefetched into L2 by the threads of the CTA (thread i takes lines i, i + threads, ...).
__device__ __forceinline__ void prefetch_l2_range(const void* p, long long bytes, int thread, int threads) {
  const char* c = static_cast<const char*>(p);
  for (long long off = static_cast<long long>(thread) * 128; off < bytes; off += static_cast<long long>(threads) * 128)
    prefetch_l2(c + off);
}

// Whether launches on the current device use PDL: compute capability 9.0 or newer, and DCC_PDL unset or not "0"
// (read at every launch, so a test can compare both in one process; the capability once per device index).
inline bool enabled() {
  const char* e = std::getenv("DCC_PDL");
  if (e != nullptr && e[0] == '0') return false;
  static int major[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major[dev] == 0) {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    major[dev] = m;   // a benign race: every writer stores the same value
  }
  return major[dev] >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute where enabled(). Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace dcc_pdl
