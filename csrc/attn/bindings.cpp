// pybind11 bindings of csrc/attn/attn.h: raw device pointers (Python ints), shapes and a cudaStream_t (int); no
// libtorch. A CUDA error from an entry point becomes a RuntimeError naming the function and the error.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "attn.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }
cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("dcc attn: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

PYBIND11_MODULE(dcc_attn_ext, m) {
  m.doc() =
      "dcc's fast-decoder kernels (csrc/attn): residual + RMSNorm, SiLU-mul, RoPE + KV write (decode step, prefill), "
      "decode attention.";
  m.def(
      "add_rmsnorm",
      [](std::uintptr_t h, std::uintptr_t delta, std::uintptr_t w, std::uintptr_t out, int M, int H, float eps,
         int dt, int norm, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_attn::add_rmsnorm(static_cast<float*>(ptr(h)), ptr(delta), ptr(w), ptr(out), M, H, eps, dt, norm,
                                    stream_of(stream));
        }
        check(e, "add_rmsnorm");
      },
      py::arg("h"), py::arg("delta"), py::arg("w"), py::arg("out"), py::arg("M"), py::arg("H"), py::arg("eps"),
      py::arg("dt"), py::arg("norm"), py::arg("stream") = 0);
  m.def(
      "silu_mul",
      [](std::uintptr_t gu, std::uintptr_t out, int M, int I, long long stride, int dt, std::uintptr_t stream,
         int block) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_attn::silu_mul(ptr(gu), ptr(out), M, I, stride, block, dt, stream_of(stream));
        }
        check(e, "silu_mul");
      },
      py::arg("gu"), py::arg("out"), py::arg("M"), py::arg("I"), py::arg("stride"), py::arg("dt"),
      py::arg("stream") = 0, py::arg("block") = 0);
  m.def(
      "rope_write",
      [](std::uintptr_t qkv, long long stride, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t pos,
         std::uintptr_t q_out, std::uintptr_t kc, std::uintptr_t ks, std::uintptr_t kz, std::uintptr_t vc,
         std::uintptr_t vs, std::uintptr_t vz, int B, int H, int KVH, int D, int T, int in_dt, int q_dt, int kv4,
         std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_attn::rope_write(ptr(qkv), stride, static_cast<const float*>(ptr(cos)),
                                   static_cast<const float*>(ptr(sin)), static_cast<const long long*>(ptr(pos)),
                                   ptr(q_out), ptr(kc), ptr(ks), ptr(kz), ptr(vc), ptr(vs), ptr(vz), B, H, KVH, D, T,
                                   in_dt, q_dt, kv4, stream_of(stream));
        }
        check(e, "rope_write");
      });
  m.def(
      "rope_write_rows",
      [](std::uintptr_t qkv, long long stride, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t q_out,
         std::uintptr_t kc, std::uintptr_t ks, std::uintptr_t kz, std::uintptr_t vc, std::uintptr_t vs,
         std::uintptr_t vz, std::uintptr_t kd, std::uintptr_t vd, int B, int S, int H, int KVH, int D, int T,
         int in_dt, int q_dt, int kv4, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_attn::rope_write_rows(ptr(qkv), stride, static_cast<const float*>(ptr(cos)),
                                        static_cast<const float*>(ptr(sin)), ptr(q_out), ptr(kc), ptr(ks), ptr(kz),
                                        ptr(vc), ptr(vs), ptr(vz), ptr(kd), ptr(vd), B, S, H, KVH, D, T, in_dt, q_dt,
                                        kv4, stream_of(stream));
        }
        check(e, "rope_write_rows");
      });
  m.def(
      "decode_attention",
      [](std::uintptr_t q, std::uintptr_t qkv, long long stride, std::uintptr_t cos, std::uintptr_t sin, int in_dt,
         std::uintptr_t kc, std::uintptr_t ks, std::uintptr_t kz, std::uintptr_t vc, std::uintptr_t vs,
         std::uintptr_t vz, std::uintptr_t pos, std::uintptr_t out, std::uintptr_t ws, int B, int H, int KVH, int D,
         int T, int chunk, int nsplit, int kv, int out_dt, std::uintptr_t stream) {
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = dcc_attn::decode_attention(static_cast<const float*>(ptr(q)), ptr(qkv), stride,
                                         static_cast<const float*>(ptr(cos)), static_cast<const float*>(ptr(sin)),
                                         in_dt, ptr(kc), ptr(ks), ptr(kz), ptr(vc), ptr(vs), ptr(vz),
                                         static_cast<const long long*>(ptr(pos)), ptr(out),
                                         static_cast<float*>(ptr(ws)), B, H, KVH, D, T, chunk, nsplit, kv, out_dt,
                                         stream_of(stream));
        }
        check(e, "decode_attention");
      });
}
