// cuBLAS through dlopen: the extension has no link-time dependency on cuBLAS (nor on its headers), so it builds
// with nvcc + pybind11 alone and, inside a PyTorch process, uses the libcublas PyTorch already loaded.
#include <dlfcn.h>

#include <library_types.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "util.h"
#include "w4a16.h"

#if defined(__has_include)
#if __has_include(<cublas_api.h>)
#include <cublas_api.h>
#define DCC_HAVE_CUBLAS_HEADER 1
#endif
#endif

namespace dcc_w4a16 {

namespace {

// The part of cuBLAS's C ABI used here (cublas_api.h). Its enums are plain C enums, passed as int.
using Handle = void*;
using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using GemmExFn = int (*)(Handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                         int Atype, int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype,
                         int ldc, int computeType, int algo);
constexpr int kOpN = 0, kOpT = 1;        // CUBLAS_OP_N, CUBLAS_OP_T
constexpr int kCompute32F = 68;          // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;         // CUBLAS_GEMM_DEFAULT
#ifdef DCC_HAVE_CUBLAS_HEADER
static_assert(CUBLAS_OP_N == kOpN && CUBLAS_OP_T == kOpT, "cuBLAS operation enum changed");
static_assert(CUBLAS_COMPUTE_32F == kCompute32F, "cuBLAS compute type enum changed");
static_assert(CUBLAS_GEMM_DEFAULT == kGemmDefault, "cuBLAS algo enum changed");
static_assert(sizeof(cublasOperation_t) == sizeof(int) && sizeof(cublasComputeType_t) == sizeof(int) &&
                  sizeof(cublasGemmAlgo_t) == sizeof(int) && sizeof(cudaDataType) == sizeof(int),
              "cuBLAS enums are not int-sized");
#endif

struct Cublas {
  std::mutex mu;
  void* lib = nullptr;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  std::unordered_map<int, Handle> handles;  // one per device, created on first use there
};

Cublas& state() {
  static Cublas* s = new Cublas();  // never destroyed: handles may outlive interpreter teardown order
  return *s;
}

std::string open_locked(Cublas& s, const std::string& path) {
  if (s.gemm_ex != nullptr) return "";
  void* lib = nullptr;
  std::string tried;
  if (!path.empty()) {
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) tried += std::string(" ") + path + " (" + dlerror() + ")";
  } else {
    const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    for (const char* n : names) {  // one already in the process (PyTorch's) first
      lib = dlopen(n, RTLD_NOW | RTLD_NOLOAD);
      if (lib != nullptr) break;
    }
    for (int i = 0; lib == nullptr && i < 3; ++i) {
      lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
      if (lib == nullptr) tried += std::string(" ") + names[i];
    }
  }
  if (lib == nullptr) return "cannot open cuBLAS (tried" + tried + ")";
  auto create = reinterpret_cast<CreateFn>(dlsym(lib, "cublasCreate_v2"));
  auto set_stream = reinterpret_cast<SetStreamFn>(dlsym(lib, "cublasSetStream_v2"));
  auto gemm_ex = reinterpret_cast<GemmExFn>(dlsym(lib, "cublasGemmEx"));
  if (create == nullptr || set_stream == nullptr || gemm_ex == nullptr) return "cuBLAS library lacks cublasGemmEx";
  s.lib = lib;
  s.create = create;
  s.set_stream = set_stream;
  s.gemm_ex = gemm_ex;
  return "";
}

}  // namespace

std::string cublas_init(const std::string& path) {
  Cublas& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return open_locked(s, path);
}

bool cublas_ready() {
  Cublas& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.gemm_ex != nullptr;
}

void cublas_gemm_nt(DType dt, const void* x, const void* w, void* out, int M, int N, int K, cudaStream_t stream) {
  if (M == 0) return;
  Cublas& s = state();
  std::lock_guard<std::mutex> lock(s.mu);  // the handle's stream is shared state: set + gemm under one lock
  const std::string err = open_locked(s, "");
  if (!err.empty()) throw std::runtime_error("dcc w4a16: " + err);
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  Handle& h = s.handles[dev];
  if (h == nullptr) {
    const int st = s.create(&h);
    if (st != 0) {
      h = nullptr;
      throw std::runtime_error("dcc w4a16: cublasCreate failed with status " + std::to_string(st));
    }
  }
  int st = s.set_stream(h, stream);
  if (st != 0) throw std::runtime_error("dcc w4a16: cublasSetStream failed with status " + std::to_string(st));
  const int type = dt == DType::kFloat16 ? CUDA_R_16F : CUDA_R_16BF;
  const float alpha = 1.f, beta = 0.f;
  // Column-major view: out^T [N x M] = (w [K x N])^T * x^T [K x M]; w and x are row-major [N, K] and [M, K].
  st = s.gemm_ex(h, kOpT, kOpN, N, M, K, &alpha, w, type, K, x, type, K, &beta, out, type, N, kCompute32F,
                 kGemmDefault);
  if (st != 0) throw std::runtime_error("dcc w4a16: cublasGemmEx failed with status " + std::to_string(st));
}

}  // namespace dcc_w4a16
