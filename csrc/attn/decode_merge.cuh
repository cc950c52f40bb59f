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
    // Each thread 4 adjacent outputs (G x D / 4 = 128 = THREADS at G = 4, D = 128: one pass), their splits'
    // partials as 16-byte loads, 16 in flight at a time: 2 round trips at 24 splits. (One output at a time with 8
    // loads in flight took 4 x 3 dependent round trips, most of the kernel's time at batch 1.) Each output sums
    // its splits in split order, as before.
    for (int v = threadIdx.x; v < G * D / 4; v += THREADS) {
      const int g = 4 * v / D, c = 4 * v % D;
      const float4* src = reinterpret_cast<const float4*>(ws + (bh0 + g) * nsplit * D + c);
      float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 16
      for (int s2 = 0; s2 < nsplit; ++s2) {
        const float4 pv = __ldcg(src + static_cast<long long>(s2) * (D / 4));
        const float w = wgt[g][s2];
        o[0] += w * pv.x;
        o[1] += w * pv.y;
        o[2] += w * pv.z;
        o[3] += w * pv.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) storex(out, (bh0 + g) * D + c + j, o[j] / lsum[g], out_dt);
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
