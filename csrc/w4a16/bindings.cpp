// pybind11 bindings: raw device pointers (Python ints), shapes and a cudaStream_t (int); no libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "w4a16.h"

namespace py = pybind11;
using dcc_w4a16::DType;

namespace {

DType dtype_of(const std::string& name) {
  if (name == "float16" || name == "fp16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  throw std::invalid_argument("dcc w4a16: dtype must be float16 or bfloat16, got " + name);
}

template <typename T = void>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(dcc_w4a16_ext, m) {
  m.doc() = "dcc W4A16 CUDA kernels for the TinyChat v2 layout (raw device pointers; see csrc/w4a16/w4a16.h)";

  m.def(
      "gemv",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t bias,
         std::uintptr_t out, int M, int N, int K, int group_size, const std::string& dtype, int mtiles,
         std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::gemv(dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(bias), ptr(out), M, N, K,
                        group_size, mtiles, stream_of(stream));
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("bias"), py::arg("out"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("dtype"), py::arg("mtiles") = 0,
      py::arg("stream") = 0,
      "Fused dequantise + tensor-core product (weights read once per 8*mtiles rows of x). bias = 0 for none.");

  m.def(
      "gemv_glu",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t out,
         int M, int N, int K, int group_size, const std::string& dtype, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::gemv_glu(dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(out), M, N, K,
                            group_size, stream_of(stream));
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("out"), py::arg("M"),
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("dtype"), py::arg("stream") = 0,
      "gate_up GEMV + SwiGLU: rows interleave gate and up in blocks of 8; out [M, N / 2] = SiLU(gate) * up.");
  m.def("gemv_glu_fits", &dcc_w4a16::gemv_glu_fits, py::arg("M"), py::arg("N"), py::arg("K"),
        "Whether gemv_glu takes this shape (M <= 8, K % 128 == 0, N % 16 == 0).");

  m.def(
      "gemv_add_rmsnorm",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t delta,
         int M, int N, int K, int group_size, std::uintptr_t h, std::uintptr_t weight, std::uintptr_t x_out, float eps,
         std::uintptr_t counter, const std::string& dtype, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::gemv_add_rmsnorm(dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(delta), M, N,
                                    K, group_size, static_cast<float*>(ptr(h)), ptr(weight), ptr(x_out), eps,
                                    static_cast<unsigned*>(ptr(counter)), stream_of(stream));
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("delta"), py::arg("M"),
      py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("h"), py::arg("weight"), py::arg("x_out"),
      py::arg("eps"), py::arg("counter"), py::arg("dtype"), py::arg("stream") = 0,
      "delta = x W^T (as gemv), then h += delta and x_out = RMSNorm(h) * weight in the same launch (counter: an "
      "unsigned, zero, left zero).");
  m.def("gemv_add_rmsnorm_fits",
        [](int M, int N, int K, const std::string& dtype) {
          return dcc_w4a16::gemv_add_rmsnorm_fits(dtype_of(dtype), M, N, K);
        },
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"),
        "Whether gemv_add_rmsnorm takes this shape on the current device.");

  m.def(
      "gemm",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t bias,
         std::uintptr_t out, std::uintptr_t w_scratch, int M, int N, int K, int group_size, const std::string& dtype,
         std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::gemm_dequant_cublas(dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(bias),
                                       ptr(out), ptr(w_scratch), M, N, K, group_size, stream_of(stream));
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("bias"), py::arg("out"),
      py::arg("w_scratch"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("dtype"),
      py::arg("stream") = 0, "Dequantise into w_scratch [N, K], then cuBLAS GEMM (fp32 accumulation), then bias.");

  m.def(
      "dequantize",
      [](std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t w, int N, int K,
         int group_size, const std::string& dtype, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::dequantize(dtype_of(dtype), ptr(qweight), ptr(scales), ptr(szeros), ptr(w), N, K, group_size,
                              stream_of(stream));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("w"), py::arg("N"), py::arg("K"),
      py::arg("group_size"), py::arg("dtype"), py::arg("stream") = 0, "w [N, K] = rnd(q*s + sz) (decode_weight).");

  m.def(
      "cublas_gemm_nt",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t out, int M, int N, int K, const std::string& dtype,
         std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        dcc_w4a16::cublas_gemm_nt(dtype_of(dtype), ptr(x), ptr(w), ptr(out), M, N, K, stream_of(stream));
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"),
      py::arg("stream") = 0, "out [M, N] = x [M, K] @ w [N, K]^T through cuBLAS.");

  m.def(
      "gemm_wgmma",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t szeros, std::uintptr_t bias,
         std::uintptr_t out, int M, int N, int K, int group_size, const std::string& dtype, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        return dcc_w4a16::gemm_wgmma(dtype_of(dtype), ptr(x), ptr(qweight), ptr(scales), ptr(szeros), ptr(bias),
                                     ptr(out), M, N, K, group_size, stream_of(stream));
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("scaled_zeros"), py::arg("bias"), py::arg("out"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("dtype"), py::arg("stream") = 0,
      "Hopper wgmma GEMM (dequantised weights in registers, activations by TMA); returns the K splits launched.");
  m.def("gemm_wgmma_supported", &dcc_w4a16::gemm_wgmma_supported, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), "Whether gemm_wgmma runs this shape here (sm_90a build on an sm_90 GPU).");
  m.def("gemm_wgmma_tile", &dcc_w4a16::gemm_wgmma_tile, py::arg("M"), py::arg("N") = 0,
        "The token tile (64, 128 or 256) gemm_wgmma takes at M tokens and N channels (N = 0: by M alone).");
  m.def("cublas_init", &dcc_w4a16::cublas_init, py::arg("path") = "",
        "Open cuBLAS (dlopen); returns '' on success, else the reason.");
  m.def("cublas_ready", &dcc_w4a16::cublas_ready);
  m.def("check_problem", &dcc_w4a16::check_problem, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"));
}
