// A decode step's RoPE and KV-cache write, one warp per head vector: q heads are rotated into q_out, k heads rotated
// and v heads as they are go into slot pos[b] of the cache -- 16-bit, or QServe's KV4 (quantized per token and head
// exactly as dcc's quant_kv: common.cuh). RoPE is transformers' rotate_half form in float32, x cos + rot(x) sin with
// each product and the sum rounded separately (no FMA), as the reference evaluates it.
#include "attn.h"
#include "common.cuh"

namespace dcc_attn {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxD = 256;

__global__ void __launch_bounds__(kWarps * 32)
    rope_write_kernel(const void* qkv, long long stride, const float* __restrict__ cos_t,
                      const float* __restrict__ sin_t, const long long* __restrict__ pos, void* q_out, void* kc,
                      void* ks, void* kz, void* vc, void* vs, void* vz, int H, int KVH, int D, int T, int in_dt,
                      int q_dt, int kv4) {
  __shared__ float buf[kWarps][kMaxD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.x * kWarps + warp;   // 0..H-1 q, then KVH k, then KVH v
  const int b = blockIdx.y;
  if (head >= H + 2 * KVH) return;   // whole warps only: the shuffles below stay warp-uniform
  const long long p = pos[b];
  float* x = buf[warp];
  warp_rope(qkv, b * stride + static_cast<long long>(head) * D, cos_t + p * D, sin_t + p * D, head < H + KVH, D,
            in_dt, x, lane);
  if (head < H) {
    const long long dst = (static_cast<long long>(b) * H + head) * D;
    for (int i = lane; i < D; i += 32) storex(q_out, dst + i, x[i], q_dt);
    return;
  }
  const bool is_k = head < H + KVH;
  const int kh = is_k ? head - H : head - H - KVH;
  const long long slot = (static_cast<long long>(b) * KVH + kh) * T + p;
  warp_store_kv(x, D, slot, is_k ? kc : vc, is_k ? ks : vs, is_k ? kz : vz, in_dt, kv4, lane);
}

}  // namespace

cudaError_t rope_write(const void* qkv, long long stride, const float* cos, const float* sin, const long long* pos,
                       void* q_out, void* kc, void* ks, void* kz, void* vc, void* vs, void* vz, int B, int H, int KVH,
                       int D, int T, int in_dt, int q_dt, int kv4, cudaStream_t stream) {
  if (B <= 0 || H <= 0 || KVH <= 0 || D <= 0 || D % 2 || D > kMaxD || (in_dt != 0 && in_dt != 1)) {
    return cudaErrorInvalidValue;
  }
  if (kv4 && (in_dt != 0 && in_dt != 1)) return cudaErrorInvalidValue;
  dim3 grid((H + 2 * KVH + kWarps - 1) / kWarps, B);
  rope_write_kernel<<<grid, kWarps * 32, 0, stream>>>(qkv, stride, cos, sin, pos, q_out, kc, ks, kz, vc, vs, vz, H,
                                                      KVH, D, T, in_dt, q_dt, kv4);
  return cudaGetLastError();
}

}  // namespace dcc_attn
