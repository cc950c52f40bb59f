// Decode attention's host entry: checks the problem and dispatches by cache kind to the launchers instantiated in
// decode_attention_kv4.cu, _f16.cu and _bf16.cu (the kernel: decode_attention.cuh).
#include "decode_attention.cuh"

namespace dcc_attn {
namespace detail {
extern template DCC_ATTN_LAUNCH_D(4);
extern template DCC_ATTN_LAUNCH_D(0);
extern template DCC_ATTN_LAUNCH_D(1);
}  // namespace detail

cudaError_t decode_attention(const float* q, const void* qkv, long long stride, const float* cos, const float* sin,
                             int in_dt, void* kc, void* ks, void* kz, void* vc, void* vs, void* vz,
                             const long long* pos, void* out, float* ws, int B, int H, int KVH, int D, int T, int chunk,
                             int nsplit, int kv, int out_dt, cudaStream_t stream) {
  const bool bad_qkv = qkv != nullptr && (cos == nullptr || sin == nullptr || (in_dt != 0 && in_dt != 1) ||
                                          (kv != 4 && kv != in_dt));
  if (B <= 0 || KVH <= 0 || H % KVH || H / KVH > 8 || chunk <= 0 || chunk > detail::kMaxChunk || nsplit <= 0 ||
      static_cast<long long>(chunk) * nsplit < T ||
      (nsplit > 1 && (ws == nullptr || reinterpret_cast<uintptr_t>(ws) % 16)) ||   // the merge's 16-byte loads
      (q == nullptr && qkv == nullptr) || bad_qkv) {
    return cudaErrorInvalidValue;
  }
  const int G = H / KVH;
  const int gm = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  dim3 grid(nsplit, KVH, B);
  const detail::QkvIn qin{qkv, stride, cos, sin, in_dt};
  auto* ksh = static_cast<__half*>(ks);
  auto* kzh = static_cast<__half*>(kz);
  auto* vsh = static_cast<__half*>(vs);
  auto* vzh = static_cast<__half*>(vz);
  cudaError_t e;
#define DCC_LAUNCH(KIND)                                                                                        \
  detail::launch_d<KIND>(D, gm, grid, q, qin, kc, ksh, kzh, vc, vsh, vzh, pos, out, ws, H, KVH, T, chunk, nsplit, \
                         out_dt, stream)
  if (kv == 4) e = DCC_LAUNCH(4);
  else if (kv == 0) e = DCC_LAUNCH(0);
  else if (kv == 1) e = DCC_LAUNCH(1);
  else return cudaErrorInvalidValue;
#undef DCC_LAUNCH
  return e;
}

}  // namespace dcc_attn
