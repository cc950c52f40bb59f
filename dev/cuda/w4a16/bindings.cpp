// pybind11 module dcc_w4a16_dev: the benchmark-only GEMV variants of variants.h, with the product's calling
// convention (raw device pointers, shapes, a cudaStream_t as int). Built by dev/cuda/dev_ext.py together with the
// product's sources (csrc/w4a16, whose bindings.cpp it replaces); never installed.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "variants.h"

namespace py = pybind11;
using dcc_w4a16::DType;

namespace {

DType dtype_of(const std::string& name) {
  if (name == "float16" || name == "fp16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  throw std::invalid_argument("dcc w4a16: dtype must be float16 or bfloat16, got " + name);
}

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

PYBIND11_MODULE(dcc_w4a16_dev, m) {
  m.doc() = "dcc W4A16 benchmark-only GEMV variants (dev/cuda/w4a16; not part of the installed runtime)";
  m.def(
      "gemv_variant",
      [](int variant, std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros,
         std::uintptr_t bias, std::uintptr_t out, int M, int N, int K, int group_size, const std::string& dtype,
         std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::gemv_variant(variant, dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(bias),
                                ptr(out), M, N, K, group_size, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("variant"), py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"),
      py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"),
      py::arg("dtype"), py::arg("stream") = 0, "One of the M <= 16 GEMV variants, by index (gemv_variant_names).");
  m.def("gemv_variant_names", []() {
    py::list names;
    for (int i = 0; i < dcc_w4a16::kNumGemvVariants; ++i) names.append(dcc_w4a16::gemv_variant_name(i));
    return names;
  });
  m.def("gemv_variant_max_m", &dcc_w4a16::gemv_variant_max_m, py::arg("variant"));
}
