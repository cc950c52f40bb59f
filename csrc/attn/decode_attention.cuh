// The decode attention kernel and its launchers (decode_attention.cu has the host entry). Each cache kind is
// instantiated in its own file (decode_attention_kv4.cu, _f16.cu, _bf16.cu), so that nvcc builds the three
// in parallel.
//
// Decode attention (one query per sequence, GQA) over QServe's KV4 cache or a 16-bit cache: softmax(q K^T / sqrt(D))
// V over slots 0..pos[b]. CTA = (split, KV head, sequence), 128 threads; D / 8 lanes per token (each lane 8
// channels: one 32-bit word of codes, or one 16-byte load of 16-bit values), 128 / (D / 8) tokens per pass. All G
// query heads of the KV head are computed from one read of the cache.
// K and V read back as fp16((code - zero) * scale) (dcc's quant_kv); scores, softmax and sums in float32 (exp2 of
// log2e-scaled scores). A sequence's slots may be split over nsplit CTAs; the last of them to finish merges their
// partial (max, sum, output) triples, as flash-decoding does (one launch).
#pragma once

#include "../common/pdl.cuh"
#include "attn.h"
#include "common.cuh"

namespace dcc_attn {
namespace detail {

constexpr int kThreads = 128;
constexpr int kMaxChunk = 256;
constexpr int kMaxMerge = 64;   // splits merged through shared memory (more: the serial merge)

// This lane's 8 channels of token t: KV4 (KIND 4) one 32-bit word of codes, read back with the token's scale and
// zero; a 16-bit cache (KIND 0 fp16, 1 bf16) one 16-byte load of 8 values.
template <int KIND, int D>
__device__ __forceinline__ void load8(const void* cache, const __half* sc, const __half* ze, long long tok, int lt,
                                      float (&v)[8]) {
  if constexpr (KIND == 4) {
    // through L2 (common.cuh's load16: the step's slot is written during the PDL overlap)
    const unsigned word = __ldcg(reinterpret_cast<const unsigned*>(static_cast<const uint8_t*>(cache) + tok * (D / 2)) +
                                 lt);
    const float s = __half2float(__ldcg(sc + tok)), z = __half2float(__ldcg(ze + tok));
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = kv4_value((word >> (4 * j)) & 0xFu, s, z);
  } else {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(cache) + tok * D) + lt);
    const uint16_t* e = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = KIND == 0 ? __half2float(__ushort_as_half(e[j])) : __bfloat162float(__ushort_as_bfloat16(e[j]));
    }
  }
}

// The fused form's input: the step's qkv row (q heads, k heads, v heads; 16-bit) and the RoPE tables; qkv null:
// q is given, RoPE'd, and the new K/V are already in the cache (rope_write).
struct QkvIn {
  const void* qkv;
  long long stride;
  const float* cos;
  const float* sin;
  int in_dt;
};

template <int KIND, int TPT, int GM>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const float* __restrict__ q, const QkvIn qin, void* kc, __half* ks, __half* kz, void* vc,
                            __half* vs, __half* vz, const long long* __restrict__ pos, void* out,
                            float* __restrict__ ws, int H, int KVH, int T, int chunk, int nsplit, int out_dt) {
  constexpr int D = 8 * TPT, P = kThreads / TPT, WARPS = kThreads / 32;
  constexpr int UNROLL = 2;   // passes of the K and V loops whose loads are in flight together (8: no faster)
  __shared__ float sc[GM][kMaxChunk];
  __shared__ float red[WARPS][GM * D];
  __shared__ float stat[2][WARPS][GM];
  const int sp = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int G = H / KVH;
  const int lt = threadIdx.x % TPT, slot = threadIdx.x / TPT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // PDL (../common/pdl.cuh): while the previous kernel (the q/k/v GEMM) finishes, this split's slots of the cache
  // (all chunk of them: pos is not read before the wait) are prefetched into L2; everything else after the wait
  dcc_pdl::launch_dependents();
  {
    const long long s0 = (static_cast<long long>(b) * KVH + kh) * T + static_cast<long long>(sp) * chunk;
    const int ns = min(chunk, T - sp * chunk);
    const long long per = KIND == 4 ? D / 2 : D * 2;   // bytes a slot
    if (ns > 0) {
      dcc_pdl::prefetch_l2_range(static_cast<const char*>(kc) + s0 * per, ns * per, threadIdx.x, kThreads);
      dcc_pdl::prefetch_l2_range(static_cast<const char*>(vc) + s0 * per, ns * per, threadIdx.x, kThreads);
      if (KIND == 4 && threadIdx.x < 4) {   // the slots' fp16 scales and zeros: 2 bytes a slot, 4 arrays
        const int i = threadIdx.x;
        const __half* meta = i == 0 ? ks : i == 1 ? kz : i == 2 ? vs : vz;   // no local array (no stack)
        dcc_pdl::prefetch_l2_range(meta + s0, 2LL * ns, 0, 1);
      }
    }
  }
  dcc_pdl::wait();
  const int len = static_cast<int>(__ldcg(pos + b)) + 1;
  const int t0 = sp * chunk, t1 = min(t0 + chunk, len);
  const long long row = (static_cast<long long>(b) * KVH + kh) * T;   // slot 0 of this (sequence, KV head)
  const long long bh0 = static_cast<long long>(b) * H + kh * G;        // first query head of the group

  // q of the group's heads, this lane's 8 channels, pre-scaled by log2(e) / sqrt(D); fused: RoPE'd here from the
  // qkv row, the same float32 operations as warp_rope (so the same bits as rope_write's q)
  float qr[GM][8];
  const float qscale = kLog2e * rsqrtf(static_cast<float>(D));
  const long long p = len - 1;
  auto q_value = [&](int g, int i) -> float {   // channel i of head g, scaled (0 past the group's G heads)
    float v = 0.f;
    if (g < G && qin.qkv == nullptr) {
      v = __ldcg(q + (bh0 + g) * D + i);
    } else if (g < G) {
      const int half = D / 2;
      const long long src = b * qin.stride + (static_cast<long long>(kh) * G + g) * D;
      const float x = load16(qin.qkv, src + i, qin.in_dt);
      const float other = i < half ? -load16(qin.qkv, src + i + half, qin.in_dt)
                                   : load16(qin.qkv, src + i - half, qin.in_dt);
      v = __fadd_rn(__fmul_rn(x, qin.cos[p * D + i]), __fmul_rn(other, qin.sin[p * D + i]));
    }
    return v * qscale;
  };
  // each of the G x D values computed once, by one thread, with coalesced loads, into the scores' shared memory
  // (free until the scores loop; D <= kMaxChunk), then read back by the lanes that hold them: 4 values and 16
  // loads a thread at G = 4, D = 128 instead of 32 and 128 (every slot of the CTA computed its lanes' q itself)
  for (int i = threadIdx.x; i < GM * D; i += kThreads) sc[i / D][i % D] = q_value(i / D, i % D);
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) qr[g][j] = sc[g][8 * lt + j];
  __syncthreads();   // read before the scores loop writes sc
  // fused: the CTA whose slots hold position p writes the step's K (warp 0, RoPE'd) and V (warp 1) there first
  if (qin.qkv != nullptr && t0 <= p && p < t1) {
    if (warp < 2) {
      const long long src = b * qin.stride + (static_cast<long long>(H) + warp * KVH + kh) * D;
      float* x = red[warp];
      warp_rope(qin.qkv, src, qin.cos + p * D, qin.sin + p * D, warp == 0, D, qin.in_dt, x, lane);
      warp_store_kv(x, D, row + p, warp == 0 ? kc : vc, warp == 0 ? ks : vs, warp == 0 ? kz : vz, qin.in_dt,
                    KIND == 4, lane);
    }
    __syncthreads();   // the new slot is visible to the whole CTA before the loops read it
  }

  // scores of this split's tokens
#pragma unroll UNROLL
  for (int base = t0; base < t1; base += P) {
    const int t = base + slot;
    float part[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) part[g] = 0.f;
    if (t < t1) {
      float kv[8];
      load8<KIND, D>(kc, ks, kz, row + t, lt, kv);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int g = 0; g < GM; ++g) part[g] = fmaf(qr[g][j], kv[j], part[g]);
    }
#pragma unroll
    for (int g = 0; g < GM; ++g) {
      const float v = warp_sum<TPT>(part[g]);
      if (t < t1 && lt == 0 && g < G) sc[g][t - t0] = v;
    }
  }
  __syncthreads();
  const int n = t1 - t0;

  // max and sum of exp2 per head: each thread strides over the scores, then warps, then the CTA
  float m[GM], l[GM];
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    float v = -INFINITY;
    for (int i = threadIdx.x; i < n; i += kThreads) v = fmaxf(v, sc[g][i]);
    v = warp_max(v);
    if (lane == 0) stat[0][warp][g] = v;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    m[g] = stat[0][0][g];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) m[g] = fmaxf(m[g], stat[0][w][g]);
    float v = 0.f;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float e = exp2f(sc[g][i] - m[g]);
      sc[g][i] = e;
      v += e;
    }
    v = warp_sum<32>(v);
    if (lane == 0) stat[1][warp][g] = v;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    l[g] = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) l[g] += stat[1][w][g];
  }

  // p V: this lane's 8 channels of its tokens, then summed over the token slots (warp shuffles, then warps)
  float acc[GM][8];
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
#pragma unroll UNROLL
  for (int base = t0; base < t1; base += P) {
    const int t = base + slot;
    if (t < t1) {
      float vv[8], p[GM];
      load8<KIND, D>(vc, vs, vz, row + t, lt, vv);
#pragma unroll
      for (int g = 0; g < GM; ++g) p[g] = g < G ? sc[g][t - t0] : 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int g = 0; g < GM; ++g) acc[g][j] = fmaf(p[g], vv[j], acc[g][j]);
    }
  }
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float v = acc[g][j];
#pragma unroll
      for (int o = TPT; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[g][j] = v;
    }
  if (lane < TPT) {
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) red[warp][g * D + 8 * lt + j] = acc[g][j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) o += red[w][i];
    const int g = i / D, c = i % D;
    float mg = 0.f, lg = 0.f;
#pragma unroll
    for (int k = 0; k < GM; ++k)
      if (k == g) mg = m[k], lg = l[k];
    if (nsplit == 1) {
      storex(out, (bh0 + g) * D + c, o / lg, out_dt);
    } else {
      const long long part = (bh0 + g) * nsplit + sp;
      ws[part * D + c] = n > 0 ? o : 0.f;
      if (c == 0) {
        float* ml = ws + static_cast<long long>(gridDim.z) * H * nsplit * D;
        ml[2 * part] = n > 0 ? mg : -INFINITY;
        ml[2 * part + 1] = n > 0 ? lg : 0.f;
      }
    }
  }
  if (nsplit == 1) return;
  // The last CTA of this (sequence, KV head) to finish merges the splits' partial (max, sum, output) triples:
  // out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, M the largest m_s (flash-decoding's reduction, without a
  // second launch). Its counter (after the partials in ws) is reset to 0 for the next launch / graph replay.
  __shared__ int is_last;
  __threadfence();   // this CTA's partials are visible device-wide before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0) {
    int* cnt = reinterpret_cast<int*>(ws + static_cast<long long>(gridDim.z) * H * nsplit * (D + 2)) +
               (static_cast<long long>(b) * KVH + kh);
    is_last = atomicAdd(cnt, 1) == nsplit - 1;
    if (is_last) *cnt = 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const float* ml = ws + static_cast<long long>(gridDim.z) * H * nsplit * D;
  if (nsplit <= kMaxMerge) {
    // The splits' (max, sum) pairs of the group's heads are read once, all loads in flight together, into shared
    // memory; a warp per head turns them into weights 2^(m_s - M) and the merged sum; then each output sums its
    // splits' partials with independent loads (the serial loop below reads one split after the other: ~10 us at
    // 10 splits, a decode step's attention time at batch 1).
    __shared__ float wgt[GM][kMaxMerge];
    __shared__ float lsum[GM];
    for (int i = threadIdx.x; i < G * nsplit; i += kThreads) {
      const int g = i / nsplit, s2 = i % nsplit;
      wgt[g][s2] = __ldcg(ml + 2 * ((bh0 + g) * nsplit + s2));
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
        l += w * __ldcg(ml + 2 * ((bh0 + g) * nsplit + s2) + 1);
      }
      l = warp_sum<32>(l);
      if (lane == 0) lsum[g] = l;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += kThreads) {
      const int g = i / D, c = i % D;
      const float* src = ws + (bh0 + g) * nsplit * D + c;
      float o = 0.f;
#pragma unroll 8
      for (int s2 = 0; s2 < nsplit; ++s2) o += wgt[g][s2] * __ldcg(src + static_cast<long long>(s2) * D);
      storex(out, (bh0 + g) * D + c, o / lsum[g], out_dt);
    }
    return;
  }
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
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

template <int KIND, int TPT>
cudaError_t launch_g(int gm, dim3 grid, const float* q, const QkvIn& qin, void* kc, __half* ks, __half* kz, void* vc,
                     __half* vs, __half* vz, const long long* pos, void* out, float* ws, int H, int KVH, int T,
                     int chunk, int nsplit, int out_dt, cudaStream_t st) {
#define DCC_KV4_CASE(GMV)                                                                                            \
  case GMV:                                                                                                          \
    return dcc_pdl::launch(decode_attention_kernel<KIND, TPT, GMV>, grid, dim3(kThreads), 0, st, q, qin, kc, ks, kz,   \
                           vc, vs, vz, pos, out, ws, H, KVH, T, chunk, nsplit, out_dt);
  switch (gm) {
    DCC_KV4_CASE(1)
    DCC_KV4_CASE(2)
    DCC_KV4_CASE(4)
    DCC_KV4_CASE(8)
    default:
      return cudaErrorInvalidValue;
  }
#undef DCC_KV4_CASE
}

template <int KIND>
cudaError_t launch_d(int D, int gm, dim3 grid, const float* q, const QkvIn& qin, void* kc, __half* ks, __half* kz,
                     void* vc, __half* vs, __half* vz, const long long* pos, void* out, float* ws, int H, int KVH,
                     int T, int chunk, int nsplit, int out_dt, cudaStream_t stream) {
  switch (D) {
#define DCC_KV4_D(DV)                                                                                                \
  case DV:                                                                                                           \
    return launch_g<KIND, DV / 8>(gm, grid, q, qin, kc, ks, kz, vc, vs, vz, pos, out, ws, H, KVH, T, chunk, nsplit,  \
                                  out_dt, stream);
    DCC_KV4_D(8)
    DCC_KV4_D(16)
    DCC_KV4_D(32)
    DCC_KV4_D(64)
    DCC_KV4_D(128)
    DCC_KV4_D(256)
#undef DCC_KV4_D
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace dcc_attn

// launch_d<KIND>'s signature, for its explicit instantiation in decode_attention_<kind>.cu and the extern template
// declarations in decode_attention.cu (one instantiation per cache kind, each in its own file).
#define DCC_ATTN_LAUNCH_D(KIND)                                                                                     \
  cudaError_t launch_d<KIND>(int, int, dim3, const float*, const QkvIn&, void*, __half*, __half*, void*, __half*,   \
                             __half*, const long long*, void*, float*, int, int, int, int, int, int, cudaStream_t)
