// pybind11 bindings of csrc/w4a4/w4a4.h: raw device pointers (Python ints), shapes, the dtype code (0 fp16, 1 bf16)
// and a cudaStream_t (int); no libtorch. A CUDA error from an entry point becomes a RuntimeError naming the function
// and the error.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "w4a4.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }
cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("dcc w4a4: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

PYBIND11_MODULE(dcc_w4a4_ext, m) {
  m.doc() = "dcc W4A4 CUDA kernels for Nunchaku INT4 artifacts (raw device pointers; see csrc/w4a4/w4a4.h)";
  m.attr("GROUP") = dcc_w4a4::kGroup;

  m.def(
      "quant_act",
      [](std::uintptr_t x, std::uintptr_t smooth, std::uintptr_t lora_down_t, std::uintptr_t codes,
         std::uintptr_t ascales, std::uintptr_t lora_act, std::uintptr_t workspace, std::size_t ws_bytes, int M,
         int K, int R, int dtype, int is_unsigned, float shift, std::uintptr_t stream, std::uintptr_t ascales_t,
         int ld, int fp8_codes) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::quant_act(ptr(x), ptr(smooth), ptr(lora_down_t), ptr(codes), ptr(ascales), ptr(lora_act),
                                  ptr(workspace), ws_bytes, M, K, R, dtype, is_unsigned, shift, stream_of(stream),
                                  ptr(ascales_t), ld, fp8_codes);
        }
        check(e, "quant_act");
      },
      py::arg("x"), py::arg("smooth"), py::arg("lora_down_t"), py::arg("codes"), py::arg("ascales"),
      py::arg("lora_act"), py::arg("workspace"), py::arg("ws_bytes"), py::arg("M"), py::arg("K"), py::arg("R"),
      py::arg("dtype"), py::arg("is_unsigned"), py::arg("shift"), py::arg("stream") = 0, py::arg("ascales_t") = 0,
      py::arg("ld") = 0, py::arg("fp8_codes") = 0,
      "16-bit x [M, K] -> int8 codes [M, K], 16-bit ascales [M, K/64], fp32 lora_act [M, R], and where ascales_t is "
      "given the scales as fp32 [K/64, ld] for gemm_wgmma (w4a4.h).");
  m.def(
      "lora_down",
      [](std::uintptr_t x, std::uintptr_t lora_down_t, std::uintptr_t lora_act, int M, int K, int R, int dtype,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::lora_down(ptr(x), ptr(lora_down_t), ptr(lora_act), M, K, R, dtype, stream_of(stream));
        }
        check(e, "lora_down");
      },
      py::arg("x"), py::arg("lora_down_t"), py::arg("lora_act"), py::arg("M"), py::arg("K"), py::arg("R"),
      py::arg("dtype"), py::arg("stream") = 0,
      "The low-rank down-projection alone, token-blocked: fp32 lora_act [M, R], quant_act's bits (w4a4.h).");
  m.def("quant_act_workspace", &dcc_w4a4::quant_act_workspace, py::arg("M"), py::arg("K"), py::arg("R"),
        "Bytes of fp32 scratch quant_act needs (M x K/64 x R floats; 0 without a low-rank branch).");
  m.def(
      "gemm",
      [](std::uintptr_t acodes, std::uintptr_t ascales, std::uintptr_t wcodes, std::uintptr_t wscales,
         std::uintptr_t bias, std::uintptr_t lora_act, std::uintptr_t lora_up, std::uintptr_t out, int M, int N,
         int K, int R, int dtype, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::gemm(ptr(acodes), ptr(ascales), ptr(wcodes), ptr(wscales), ptr(bias), ptr(lora_act),
                             ptr(lora_up), ptr(out), M, N, K, R, dtype, stream_of(stream));
        }
        check(e, "gemm");
      },
      py::arg("acodes"), py::arg("ascales"), py::arg("wcodes"), py::arg("wscales"), py::arg("bias"),
      py::arg("lora_act"), py::arg("lora_up"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("R"), py::arg("dtype"), py::arg("stream") = 0,
      "W4A4 GEMM (mma.sync, fp32 group accumulation, bias and low-rank epilogue); out 16-bit [M, N] (w4a4.h).");
  m.def(
      "gemm_wgmma",
      [](std::uintptr_t acodes, std::uintptr_t ascales_t, int ld, std::uintptr_t wcodes, std::uintptr_t wscales_t,
         std::uintptr_t bias, std::uintptr_t lora_act, std::uintptr_t lora_up, std::uintptr_t out, int M, int N,
         int K, int R, int dtype, int fp8, std::uintptr_t stream, int lora_tc, std::uintptr_t lora_up_f32) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::gemm_wgmma(ptr(acodes), ptr(ascales_t), ld, ptr(wcodes), ptr(wscales_t), ptr(bias),
                                   ptr(lora_act), ptr(lora_up), ptr(out), M, N, K, R, dtype, fp8, stream_of(stream),
                                   lora_tc, ptr(lora_up_f32));
        }
        check(e, "gemm_wgmma");
      },
      py::arg("acodes"), py::arg("ascales_t"), py::arg("ld"), py::arg("wcodes"), py::arg("wscales_t"),
      py::arg("bias"), py::arg("lora_act"), py::arg("lora_up"), py::arg("out"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("R"), py::arg("dtype"), py::arg("fp8") = 0, py::arg("stream") = 0,
      py::arg("lora_tc") = 0, py::arg("lora_up_f32") = 0,
      "W4A4 GEMM on Hopper wgmma, bit-identical to gemm; scales fp32 group-major [K/64, ld] / [K/64, N]; "
      "lora_tc = 1: the low rank on the tensor cores from lora_up_f32 instead (not bit-identical; w4a4.h).");
  m.def("gemm_wgmma_supported", &dcc_w4a4::gemm_wgmma_supported, py::arg("M"), py::arg("N"), py::arg("K"),
        "gemm_wgmma runs this shape on the current GPU (sm_90 with the sm_90a kernels built; N % 64, K % 128).");
  m.def("gemm_wgmma_tile", &dcc_w4a4::gemm_wgmma_tile, py::arg("M"), py::arg("N"),
        "The token tile (64 or 128) gemm_wgmma picks for M x N.");
  m.def("gemm_wgmma_kernel", &dcc_w4a4::gemm_wgmma_kernel, py::arg("M"), py::arg("N"), py::arg("R"),
        "Which of gemm_wgmma's kernels (1, or 2: 128 x 128 tiles) takes M x N at rank R.");
  m.def(
      "quant_act_nvfp4",
      [](std::uintptr_t x, std::uintptr_t smooth, std::uintptr_t lora_down_t, std::uintptr_t codes,
         std::uintptr_t ascales, std::uintptr_t lora_act, std::uintptr_t workspace, std::size_t ws_bytes, int M,
         int K, int R, int dtype, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::quant_act_nvfp4(ptr(x), ptr(smooth), ptr(lora_down_t), ptr(codes), ptr(ascales),
                                        ptr(lora_act), ptr(workspace), ws_bytes, M, K, R, dtype, stream_of(stream));
        }
        check(e, "quant_act_nvfp4");
      },
      py::arg("x"), py::arg("smooth"), py::arg("lora_down_t"), py::arg("codes"), py::arg("ascales"),
      py::arg("lora_act"), py::arg("workspace"), py::arg("ws_bytes"), py::arg("M"), py::arg("K"), py::arg("R"),
      py::arg("dtype"), py::arg("stream") = 0,
      "16-bit x [M, K] -> e2m1 codes uint8 [M, K], e4m3 micro-scales uint8 [M, K/16], fp32 lora_act [M, R].");
  m.def(
      "gemm_nvfp4",
      [](std::uintptr_t acodes, std::uintptr_t ascales, std::uintptr_t wcodes, std::uintptr_t wscales, float alpha,
         std::uintptr_t wcscales, std::uintptr_t bias, std::uintptr_t lora_act, std::uintptr_t lora_up,
         std::uintptr_t out, int M, int N, int K, int R, int dtype, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_w4a4::gemm_nvfp4(ptr(acodes), ptr(ascales), ptr(wcodes), ptr(wscales), alpha, ptr(wcscales),
                                   ptr(bias), ptr(lora_act), ptr(lora_up), ptr(out), M, N, K, R, dtype,
                                   stream_of(stream));
        }
        check(e, "gemm_nvfp4");
      },
      py::arg("acodes"), py::arg("ascales"), py::arg("wcodes"), py::arg("wscales"), py::arg("alpha"),
      py::arg("wcscales"), py::arg("bias"), py::arg("lora_act"), py::arg("lora_up"), py::arg("out"), py::arg("M"),
      py::arg("N"), py::arg("K"), py::arg("R"), py::arg("dtype"), py::arg("stream") = 0,
      "NVFP4 GEMM (e2m1 x e2m1 per 16-k group, fp32 accumulation, alpha, wcscales, bias, low rank); out 16-bit.");
}
