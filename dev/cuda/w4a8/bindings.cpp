// pybind11 module dcc_w4a8_dev: the benchmark-only W4A8 kernels of dev.h (gemm_dev_kernel and its workspace) with
// the product's calling convention (raw device pointers, shapes, a cudaStream_t as int). Built by
// dev/cuda/dev_ext.py together with the product's mma.sync sources; never installed.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dev.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

PYBIND11_MODULE(dcc_w4a8_dev, m) {
  m.doc() = "dcc W4A8 benchmark-only kernels (dev/cuda/w4a8; not part of the installed runtime)";
  m.def(
      "gemm_dev_kernel",
      [](int kernel, std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, std::uintptr_t qweight,
         std::uintptr_t s1_scales, std::uintptr_t s1_szeros, std::uintptr_t s2_scales, std::uintptr_t s2_zeros,
         std::uintptr_t out, int M, int N, int K, int group, std::uintptr_t ws, std::size_t ws_bytes,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::gemm_dev_kernel(kernel, ptr(xq), ptr(ascale), ptr(asum), ptr(qweight), ptr(s1_scales),
                                        ptr(s1_szeros), ptr(s2_scales), ptr(s2_zeros), ptr(out), M, N, K, group,
                                        ptr(ws), ws_bytes, reinterpret_cast<cudaStream_t>(stream));
        }
        if (e != cudaSuccess)
          throw std::runtime_error(std::string("dcc w4a8 dev: gemm_dev_kernel: ") + cudaGetErrorString(e));
      },
      py::arg("kernel"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("qweight"),
      py::arg("s1_scales"), py::arg("s1_szeros"), py::arg("s2_scales"), py::arg("s2_zeros"), py::arg("out"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("workspace"), py::arg("ws_bytes"),
      py::arg("stream") = 0, "A benchmark-only kernel by code (1 | shape << 4 | S << 8: split-K; 3 | shape << 4).");
  m.def("gemm_dev_kernel_workspace", &dcc_w4a8::gemm_dev_kernel_workspace, py::arg("kernel"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("group"),
        "Bytes of zero-initialised workspace; stream-K needs a buffer of its own.");
}
