// Host-side helpers shared by the W4A16 translation units.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace dcc_w4a16 {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("dcc w4a16: ") + what + ": " + cudaGetErrorString(e));
}

inline int log2_group(int group_size) {
  switch (group_size) {
    case 32: return 5;
    case 64: return 6;
    case 128: return 7;
    default:
      throw std::invalid_argument("dcc w4a16: group size " + std::to_string(group_size) +
                                  " is not supported (32, 64 or 128)");
  }
}

inline void check_aligned(const void* p, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16)
    throw std::invalid_argument(std::string("dcc w4a16: ") + name + " is not 16-byte aligned");
}

}  // namespace dcc_w4a16
