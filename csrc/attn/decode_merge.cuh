// The split merge of decode_attention_kernel (decode_attention.cuh): the last CTA of a (sequence, KV head) to
// finish combines the splits' partial (max, sum, output) triples, flash-decoding's reduction without a second launch:
// out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, M the largest m_s.
#pragma once

#include "common.cuh"

namespace dcc_attn {
namespace detail {

constexpr int kMaxMerge = 64;   // splits merged through shared memory (more: the serial merge)

// ws holds the partial outputs [B * H * nsplit, D] (16-byte aligned: D % 8 == 0), then the (m, l) pairs
// [B * H * nsplit, 2], then one arrival counter per (sequence, KV head). Called by every thread of every CTA after
// its partials are written; returns in all but the last CTA. smem: at least 2 * GM * kMaxMerge floats, free for the
// merge's use.
template <int GM, int THREADS>
__device__ __forceinline__ void merge_splits(float* __restrict__ ws, void* out, float* smem, long long bh0, int G,
                                             int D, int nsplit, int H, long long kv_index, int out_dt) {
  constexpr int WARPS = THREADS / 32;
  __shared__ int is_last;
  __shared__ float lsum[GM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long parts = static_cast<long long>(gridDim.z) * H * nsplit;
  __threadfence();   // this CTA's partials are visible device-wide before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0) {
    int* cnt = reinterpret_cast<int*>(ws + parts * (D + 2)) + kv_index;
    is_last = atomicAdd(cnt, 1) == nsplit - 1;
    if (is_last) *cnt = 0;   // reset for the next launch / graph replay
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const float* ml = ws + parts * D;
  if (nsplit <= kMaxMerge) {
    // The splits' (max, sum) pairs of the group's heads, one 8-byte load each, all in flight together, into shared
    // memory; a warp per head turns them into weights 2^(m_s - M) and the merged sum; then each output sums its
    // splits' partials with independent loads.
    float(*wgt)[kMaxMerge] = reinterpret_cast<float(*)[kMaxMerge]>(smem);
    float(*lv)[kMaxMerge] = reinterpret_cast<float(*)[kMaxMerge]>(smem + GM * kMaxMerge);
    for (int i = threadIdx.x; i < G * nsplit; i += THREADS) {
      const int g = i / nsplit, s2 = i % nsplit;
      const float2 v = __ldcg(reinterpret_cast<const float2*>(ml) + (bh0 + g) * nsplit + s2);
      wgt[g][s2] = v.x;
      lv[g][s2] = v.y;
    }
    __syncthreads();
    for (int g = warp; g < G; g += WARPS) {
      float mx = -INFINITY;
      for (int s2 = lane; s2 < nsplit; s2 += 32) mx = fmaxf(mx, wgt[g][s2]);
      mx = warp_max(mx);
      float l = 0.f;
      for (int s2 = lane; s2 < nsplit; s2 += 32) {
        const float ms = wgt[g][s2];
        const float w = ms == -INFINITY ? 0.f : exp2f(ms - mx);
        wgt[g][s2] = w;
        l += w * lv[g][s2];
      }
      l = warp_sum<32>(l);
      if (lane == 0) lsum[g] = l;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += THREADS) {
      const int g = i / D, c = i % D;
      const float* src = ws + (bh0 + g) * nsplit * D + c;
      float o = 0.f;
#pragma unroll 8
      for (int s2 = 0; s2 < nsplit; ++s2) o += wgt[g][s2] * __ldcg(src + static_cast<long long>(s2) * D);
      storex(out, (bh0 + g) * D + c, o / lsum[g], out_dt);
    }
    return;
  }
  for (int i = threadIdx.x; i < G * D; i += THREADS) {
    const int g = i / D, c = i % D;
    const long long p0 = (bh0 + g) * nsplit;
    float mx = -INFINITY;
    for (int s2 = 0; s2 < nsplit; ++s2) mx = fmaxf(mx, __ldcg(ml + 2 * (p0 + s2)));
    float o = 0.f, l = 0.f;
    for (int s2 = 0; s2 < nsplit; ++s2) {
      const float ms = __ldcg(ml + 2 * (p0 + s2));
      const float w = ms == -INFINITY ? 0.f : exp2f(ms - mx);
      o += w * __ldcg(ws + (p0 + s2) * D + c);
      l += w * __ldcg(ml + 2 * (p0 + s2) + 1);
    }
    storex(out, (bh0 + g) * D + c, o / l, out_dt);
  }
}

}  // namespace detail
}  // namespace dcc_attn
