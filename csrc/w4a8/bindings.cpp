// pybind11 bindings of csrc/w4a8/w4a8.h: raw device pointers (Python ints), shapes and a cudaStream_t (int); no
// libtorch. A CUDA error from an entry point becomes a RuntimeError naming the function and the error.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "w4a8.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }
cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("dcc w4a8: ") + what + ": " + cudaGetErrorString(e));
}

using GemmFn = cudaError_t (*)(const void*, const void*, const void*, const void*, const void*, const void*,
                               const void*, const void*, void*, int, int, int, int, void*, size_t, cudaStream_t);

void bind_gemm(py::module_& m, const char* name, GemmFn fn, const char* doc) {
  m.def(
      name,
      [fn, name](std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, std::uintptr_t qweight,
                 std::uintptr_t s1_scales, std::uintptr_t s1_szeros, std::uintptr_t s2_scales,
                 std::uintptr_t s2_zeros, std::uintptr_t out, int M, int N, int K, int group,
                 std::uintptr_t workspace, std::size_t ws_bytes, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = fn(ptr(xq), ptr(ascale), ptr(asum), ptr(qweight), ptr(s1_scales), ptr(s1_szeros), ptr(s2_scales),
                 ptr(s2_zeros), ptr(out), M, N, K, group, ptr(workspace), ws_bytes, stream_of(stream));
        }
        check(e, name);
      },
      py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("qweight"), py::arg("s1_scales"),
      py::arg("s1_szeros"), py::arg("s2_scales"), py::arg("s2_zeros"), py::arg("out"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("group"), py::arg("workspace"), py::arg("ws_bytes"), py::arg("stream") = 0, doc);
}

}  // namespace

PYBIND11_MODULE(dcc_w4a8_ext, m) {
  m.doc() = "dcc W4A8 CUDA kernels for the QServe layout (raw device pointers; see csrc/w4a8/w4a8.h)";

  m.def(
      "quant_act",
      [](std::uintptr_t x, std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, int M, int K,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::quant_act(ptr(x), ptr(xq), ptr(ascale), ptr(asum), M, K, stream_of(stream));
        }
        check(e, "quant_act");
      },
      py::arg("x"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("M"), py::arg("K"),
      py::arg("stream") = 0, "fp16 x [M, K] -> int8 xq [M, K], fp16 ascale [M], fp16 asum [M] (asum = 0: skip).");
  m.def(
      "norm_quant",
      [](std::uintptr_t x, std::uintptr_t gamma, float eps, std::uintptr_t xq, std::uintptr_t ascale,
         std::uintptr_t asum, int M, int H, int approx, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::norm_quant(ptr(x), ptr(gamma), eps, ptr(xq), ptr(ascale), ptr(asum), M, H, approx,
                                   stream_of(stream));
        }
        check(e, "norm_quant");
      },
      py::arg("x"), py::arg("gamma"), py::arg("eps"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("M"),
      py::arg("H"), py::arg("approx"), py::arg("stream") = 0,
      "QServe's rms_norm_general[_fuse_sum] (a layer norm + int8 per token; asum = 0: no sum), quant_fused.cu.");
  m.def(
      "norm_y",
      [](std::uintptr_t x, std::uintptr_t gamma, float eps, std::uintptr_t y, int M, int H, int approx,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::norm_y(ptr(x), ptr(gamma), eps, ptr(y), M, H, approx, stream_of(stream));
        }
        check(e, "norm_y");
      },
      py::arg("x"), py::arg("gamma"), py::arg("eps"), py::arg("y"), py::arg("M"), py::arg("H"), py::arg("approx"),
      py::arg("stream") = 0, "norm_quant's first half: fp16 x [M, H] -> its float32 normed values y [M, H].");
  m.def(
      "quant_normed",
      [](std::uintptr_t y, std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, int M, int H, int approx,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::quant_normed(ptr(y), ptr(xq), ptr(ascale), ptr(asum), M, H, approx, stream_of(stream));
        }
        check(e, "quant_normed");
      },
      py::arg("y"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("M"), py::arg("H"), py::arg("approx"),
      py::arg("stream") = 0, "norm_quant's second half: float32 y [M, H] -> int8 xq, fp16 ascale [M], asum [M].");
  m.def(
      "quant_engine",
      [](std::uintptr_t x, std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, int M, int K, int approx,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::quant_engine(ptr(x), ptr(xq), ptr(ascale), ptr(asum), M, K, approx, stream_of(stream));
        }
        check(e, "quant_engine");
      },
      py::arg("x"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("M"), py::arg("K"), py::arg("approx"),
      py::arg("stream") = 0, "QServe's standalone quant_kernel[_fuse_sum]: fp16 x [M, K] -> int8 xq, fp16 ascale [M], asum [M].");
  m.def(
      "silu_mul",
      [](std::uintptr_t gate, std::uintptr_t up, std::uintptr_t out, int M, int D, int approx,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::silu_mul(ptr(gate), ptr(up), ptr(out), M, D, approx, stream_of(stream));
        }
        check(e, "silu_mul");
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("M"), py::arg("D"), py::arg("approx"),
      py::arg("stream") = 0, "QServe's silu_and_mul: fp16 gate, up [M, D] -> fp16 out [M, D], quant_fused.cu.");
  bind_gemm(m, "gemm_mma", dcc_w4a8::gemm_mma,
            "W4A8 GEMM on mma.sync (split-K for small M, tiled otherwise); out fp16 [M, N].");
  bind_gemm(m, "gemm_wgmma", dcc_w4a8::gemm_wgmma, "W4A8 GEMM on Hopper wgmma (sm_90a); out fp16 [M, N].");
  m.def(
      "gemm_mma_kernel",
      [](int kernel, std::uintptr_t xq, std::uintptr_t ascale, std::uintptr_t asum, std::uintptr_t qweight,
         std::uintptr_t s1_scales, std::uintptr_t s1_szeros, std::uintptr_t s2_scales, std::uintptr_t s2_zeros,
         std::uintptr_t out, int M, int N, int K, int group, std::uintptr_t workspace, std::size_t ws_bytes,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a8::gemm_mma_kernel(kernel, ptr(xq), ptr(ascale), ptr(asum), ptr(qweight), ptr(s1_scales),
                                        ptr(s1_szeros), ptr(s2_scales), ptr(s2_zeros), ptr(out), M, N, K, group,
                                        ptr(workspace), ws_bytes, stream_of(stream));
        }
        check(e, "gemm_mma_kernel");
      },
      py::arg("kernel"), py::arg("xq"), py::arg("ascale"), py::arg("asum"), py::arg("qweight"),
      py::arg("s1_scales"), py::arg("s1_szeros"), py::arg("s2_scales"), py::arg("s2_zeros"), py::arg("out"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("workspace"), py::arg("ws_bytes"),
      py::arg("stream") = 0,
      "gemm_mma with the kernel forced: 0 auto, 1 split-K (M <= 32), 2 tiled, 4 cluster GEMV (w4a8.h).");
  m.def("gemm_gemv_available", &dcc_w4a8::gemm_gemv_available,
        "The cluster GEMV kernel (M <= 16) is built for this GPU (sm_90+).");
  m.def("gemm_mma_kernel_workspace", &dcc_w4a8::gemm_mma_kernel_workspace, py::arg("kernel"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("group"));
  m.def("gemm_mma_workspace", &dcc_w4a8::gemm_mma_workspace, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group"), "Bytes of zero-initialised workspace gemm_mma needs (it leaves the workspace zero).");
  m.def("gemm_wgmma_workspace", &dcc_w4a8::gemm_wgmma_workspace, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group"));
  m.def("gemm_wgmma_supported", &dcc_w4a8::gemm_wgmma_supported, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group"));
  m.def("gemm_wgmma_preferred", &dcc_w4a8::gemm_wgmma_preferred, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group"), "Supported and expected faster than the mma.sync kernels (the automatic choice).");
}
