// RoPE and KV-cache write, one warp per head vector: q heads are rotated into q_out, k heads rotated and v heads as
// they are go into the cache -- 16-bit, or QServe's KV4 (quantized per token and head exactly as dcc's quant_kv:
// common.cuh). RoPE is transformers' rotate_half form in float32, x cos + rot(x) sin with each product and the sum
// rounded separately (no FMA), as the reference evaluates it. Two entry points share the per-vector body:
//   rope_write       a decode step: one row per sequence, at position pos[b] (device int64, graph-capturable);
//   rope_write_rows  a prefill: B * S rows, sequence-major, row r at position r % S of sequence r / S; for KV4 it
//                    can also write the K/V the stored codes read back as (fp16), the prefill attention's inputs.
#include <climits>

#include "attn.h"
#include "common.cuh"

namespace dcc_attn {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxD = 256;

// One layer's cache (kv4 = 0: kc/vc in the 16-bit dtype, ks..vz unused; kv4 = 1: codes, fp16 scale and zero) and,
// for a KV4 prefill, where the read-back K/V go (fp16 [B, KVH, S, D]; null: not written).
struct CacheOut {
  void *kc, *ks, *kz, *vc, *vs, *vz;
  __half *kd, *vd;
  int T;
  int kv4;
};

// One warp, head vector `head` (0..H-1 q, then KVH k, then KVH v) of the qkv row at element offset `src`, the token
// of sequence b at position p: q rotated into q_out row `qrow` ([rows, H, D], q_dt); K/V into slot (b, kv head, p).
// deq_pos >= 0 (and c.kd/c.vd set, kv4): the slot read back, fp16, at (b, kv head, deq_pos) of kd/vd ([B, KVH, S, D],
// S = deq_len) -- read from the codes just stored, so it is kv4_dequantize of them by construction.
__device__ __forceinline__ void rope_write_head(const void* qkv, long long src, const float* cos_t, const float* sin_t,
                                                long long p, int b, int head, long long qrow, void* q_out,
                                                const CacheOut& c, long long deq_pos, long long deq_len, int H,
                                                int KVH, int D, int in_dt, int q_dt, float* x, int lane) {
  warp_rope(qkv, src + static_cast<long long>(head) * D, cos_t + p * D, sin_t + p * D, head < H + KVH, D, in_dt, x,
            lane);
  if (head < H) {
    const long long dst = (qrow * H + head) * D;
    for (int i = lane; i < D; i += 32) storex(q_out, dst + i, x[i], q_dt);
    return;
  }
  const bool is_k = head < H + KVH;
  const int kh = is_k ? head - H : head - H - KVH;
  const long long bh = static_cast<long long>(b) * KVH + kh;
  const long long slot = bh * c.T + p;
  void *cache = is_k ? c.kc : c.vc, *scale = is_k ? c.ks : c.vs, *zero = is_k ? c.kz : c.vz;
  warp_store_kv(x, D, slot, cache, scale, zero, in_dt, c.kv4, lane);
  __half* deq = is_k ? c.kd : c.vd;
  if (c.kv4 && deq != nullptr && deq_pos >= 0) {
    __syncwarp();   // the slot's codes, scale and zero, written by several lanes, are visible to the whole warp
    warp_load_kv4(cache, scale, zero, slot, D, deq + (bh * deq_len + deq_pos) * D, lane);
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    rope_write_kernel(const void* qkv, long long stride, const float* __restrict__ cos_t,
                      const float* __restrict__ sin_t, const long long* __restrict__ pos, void* q_out, CacheOut c,
                      int H, int KVH, int D, int in_dt, int q_dt) {
  __shared__ float buf[kWarps][kMaxD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.x * kWarps + warp;   // 0..H-1 q, then KVH k, then KVH v
  const int b = blockIdx.y;
  if (head >= H + 2 * KVH) return;   // whole warps only: the shuffles below stay warp-uniform
  rope_write_head(qkv, b * stride, cos_t, sin_t, pos[b], b, head, b, q_out, c, -1, 0, H, KVH, D, in_dt, q_dt,
                  buf[warp], lane);
}

// Flattened 1-D grid: block = row * head_blocks + head block (the blocks of a row are adjacent, so its qkv row is
// read by neighbours; 64 x 2048 rows of 48 heads are 393,216 blocks, far below gridDim.x's 2^31 - 1).
__global__ void __launch_bounds__(kWarps * 32)
    rope_write_rows_kernel(const void* qkv, long long stride, const float* __restrict__ cos_t,
                           const float* __restrict__ sin_t, void* q_out, CacheOut c, int S, int H, int KVH, int D,
                           int head_blocks, int in_dt, int q_dt) {
  __shared__ float buf[kWarps][kMaxD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = static_cast<int>(blockIdx.x / head_blocks);
  const int head = static_cast<int>(blockIdx.x % head_blocks) * kWarps + warp;
  if (head >= H + 2 * KVH) return;   // whole warps only
  const int b = row / S, p = row % S;
  rope_write_head(qkv, row * stride, cos_t, sin_t, p, b, head, row, q_out, c, p, S, H, KVH, D, in_dt, q_dt,
                  buf[warp], lane);
}

bool shape_ok(int B, int H, int KVH, int D, int in_dt, int q_dt) {
  return B > 0 && H > 0 && KVH > 0 && D > 0 && D % 2 == 0 && D <= kMaxD && (in_dt == 0 || in_dt == 1) && q_dt >= 0 &&
         q_dt <= 2;
}

}  // namespace

cudaError_t rope_write(const void* qkv, long long stride, const float* cos, const float* sin, const long long* pos,
                       void* q_out, void* kc, void* ks, void* kz, void* vc, void* vs, void* vz, int B, int H, int KVH,
                       int D, int T, int in_dt, int q_dt, int kv4, cudaStream_t stream) {
  if (!shape_ok(B, H, KVH, D, in_dt, q_dt) || T <= 0) return cudaErrorInvalidValue;
  const CacheOut c{kc, ks, kz, vc, vs, vz, nullptr, nullptr, T, kv4 ? 1 : 0};
  dim3 grid((H + 2 * KVH + kWarps - 1) / kWarps, B);
  rope_write_kernel<<<grid, kWarps * 32, 0, stream>>>(qkv, stride, cos, sin, pos, q_out, c, H, KVH, D, in_dt, q_dt);
  return cudaGetLastError();
}

cudaError_t rope_write_rows(const void* qkv, long long stride, const float* cos, const float* sin, void* q_out,
                            void* kc, void* ks, void* kz, void* vc, void* vs, void* vz, void* kd, void* vd, int B,
                            int S, int H, int KVH, int D, int T, int in_dt, int q_dt, int kv4, cudaStream_t stream) {
  if (!shape_ok(B, H, KVH, D, in_dt, q_dt) || S <= 0 || S > T) return cudaErrorInvalidValue;
  if ((kd == nullptr) != (vd == nullptr) || (!kv4 && kd != nullptr)) return cudaErrorInvalidValue;
  const int head_blocks = (H + 2 * KVH + kWarps - 1) / kWarps;
  const long long rows = static_cast<long long>(B) * S;
  if (rows > INT_MAX / head_blocks) return cudaErrorInvalidValue;
  const CacheOut c{kc, ks, kz, vc, vs, vz, static_cast<__half*>(kd), static_cast<__half*>(vd), T, kv4 ? 1 : 0};
  rope_write_rows_kernel<<<static_cast<unsigned>(rows * head_blocks), kWarps * 32, 0, stream>>>(
      qkv, stride, cos, sin, q_out, c, S, H, KVH, D, head_blocks, in_dt, q_dt);
  return cudaGetLastError();
}

}  // namespace dcc_attn
