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
// partial (max, sum, output) triples, as flash-decoding does (one launch; decode_merge.cuh).
//
// Latency (batch 1 is a chain of round trips, not a stream of bytes): before the PDL wait the kernel reads pos, the
// RoPE row of position pos and, where its split has at most kPrePasses passes, its slots' K and V into registers
// (DESIGN.md, "What is read before the wait"); after it, every load of the step's qkv row is issued before any is
// used, so the critical path is the qkv round trip, the arithmetic, and the merge's.
#pragma once

#include "../common/pdl.cuh"
#include "attn.h"
#include "common.cuh"
#include "decode_merge.cuh"

namespace dcc_attn {
namespace detail {

constexpr int kThreads = 128;
constexpr int kMaxChunk = 256;
constexpr int kPrePasses = 2;   // passes of K and V a thread holds in registers from before the wait

// One lane's 8 channels of one token as loaded: KV4 one 32-bit word of codes and the token's scale and zero; a
// 16-bit cache one 16-byte load of 8 values.
template <int KIND>
struct KvRaw {
  uint4 v;
};
template <>
struct KvRaw<4> {
  unsigned w;
  __half s, z;
};

// Loads of the cache go through L2 (common.cuh's load16: the step's slot is written during the PDL overlap).
template <int KIND, int D>
__device__ __forceinline__ KvRaw<KIND> fetch(const void* cache, const __half* sc, const __half* ze, long long tok,
                                             int lt) {
  KvRaw<KIND> r;
  if constexpr (KIND == 4) {
    r.w = __ldcg(reinterpret_cast<const unsigned*>(static_cast<const uint8_t*>(cache) + tok * (D / 2)) + lt);
    r.s = __ldcg(sc + tok);
    r.z = __ldcg(ze + tok);
  } else {
    r.v = __ldcg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(cache) + tok * D) + lt);
  }
  return r;
}

// The same 8 channels from warp_store_kv's shared-memory copy of a slot (keep) instead of the cache.
template <int KIND, int D>
__device__ __forceinline__ KvRaw<KIND> from_keep(const uint16_t* keep, int lt) {
  KvRaw<KIND> r;
  if constexpr (KIND == 4) {
    r.w = reinterpret_cast<const unsigned*>(keep)[lt];
    r.s = __ushort_as_half(keep[D]);
    r.z = __ushort_as_half(keep[D + 1]);
  } else {
    r.v = reinterpret_cast<const uint4*>(keep)[lt];
  }
  return r;
}

template <int KIND>
__device__ __forceinline__ void decode8(const KvRaw<KIND>& r, float (&v)[8]) {
  if constexpr (KIND == 4) {
    const float s = __half2float(r.s), z = __half2float(r.z);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = kv4_value((r.w >> (4 * j)) & 0xFu, s, z);
  } else {
    const uint16_t* e = reinterpret_cast<const uint16_t*>(&r.v);
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
__global__ void __launch_bounds__(kThreads, 1)   // min 1 block: ptxas otherwise spilled a few bytes in 9 instances
    decode_attention_kernel(const float* __restrict__ q, const QkvIn qin, void* kc, __half* ks, __half* kz, void* vc,
                            __half* vs, __half* vz, const long long* __restrict__ pos, void* out,
                            float* __restrict__ ws, int H, int KVH, int T, int chunk, int nsplit, int out_dt) {
  constexpr int D = 8 * TPT, P = kThreads / TPT, WARPS = kThreads / 32, HALF = D / 2;
  constexpr int UNROLL = 2;   // passes of the K and V loops whose loads are in flight together (8: no faster)
  constexpr int QN = (GM * D + kThreads - 1) / kThreads;   // query values a thread computes
  constexpr int RN = (HALF + 31) / 32;                      // rotate_half pairs a lane of warp 0 / 1 computes
  static_assert(2 * GM * kMaxMerge <= GM * kMaxChunk, "the merge's weights live in the scores' shared memory");
  __shared__ float sc[GM][kMaxChunk];
  __shared__ float red[WARPS][GM * D];
  __shared__ float stat[2][WARPS][GM];
  __shared__ __align__(16) uint16_t keep[2][D + 8];
  const int sp = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int G = H / KVH;
  const int lt = threadIdx.x % TPT, slot = threadIdx.x / TPT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool fused = qin.qkv != nullptr;
  float* cos_p = red[2];   // the RoPE row of position p (red is free until the P V reduction)
  float* sin_p = red[3];

  // Before the PDL wait (DESIGN.md, "What is read before the wait"): pos, the RoPE row, and this split's K and V
  // (into registers where it has at most kPrePasses passes, else prefetched into L2). All were written before this
  // step's first kernel, which is launched plainly; slot p, which this step writes, is replaced after the wait.
  dcc_pdl::launch_dependents();
  const int len = static_cast<int>(__ldcg(pos + b)) + 1;
  const long long p = len - 1;
  const int t0 = sp * chunk, t1 = min(t0 + chunk, len);
  const long long row = (static_cast<long long>(b) * KVH + kh) * T;   // slot 0 of this (sequence, KV head)
  const bool pre = chunk <= kPrePasses * P;
  KvRaw<KIND> kr[kPrePasses], vr[kPrePasses];
  if (pre) {
#pragma unroll
    for (int u = 0; u < kPrePasses; ++u) {
      const int t = t0 + u * P + slot;
      if (t < t1) {
        kr[u] = fetch<KIND, D>(kc, ks, kz, row + t, lt);
        vr[u] = fetch<KIND, D>(vc, vs, vz, row + t, lt);
      }
    }
  } else if (t1 > t0) {
    const long long per = KIND == 4 ? D / 2 : D * 2;   // bytes a slot
    const int ns = t1 - t0;
    dcc_pdl::prefetch_l2_range(static_cast<const char*>(kc) + (row + t0) * per, ns * per, threadIdx.x, kThreads);
    dcc_pdl::prefetch_l2_range(static_cast<const char*>(vc) + (row + t0) * per, ns * per, threadIdx.x, kThreads);
    if (KIND == 4 && threadIdx.x < 4) {   // the slots' fp16 scales and zeros: 2 bytes a slot, 4 arrays
      const int i = threadIdx.x;
      const __half* meta = i == 0 ? ks : i == 1 ? kz : i == 2 ? vs : vz;   // no local array (no stack)
      dcc_pdl::prefetch_l2_range(meta + row + t0, 2LL * ns, 0, 1);
    }
  }
  if (fused) {
    for (int i = threadIdx.x; i < D; i += kThreads) {
      cos_p[i] = __ldg(qin.cos + p * D + i);
      sin_p[i] = __ldg(qin.sin + p * D + i);
    }
  }
  dcc_pdl::wait();
  const long long bh0 = static_cast<long long>(b) * H + kh * G;   // first query head of the group
  const bool owner = fused && t0 <= p && p < t1;                 // this CTA writes the step's K and V (slot p)

  // Every load of the step's inputs first: this thread's query values (fused: each with its rotate_half partner)
  // and, in the owner CTA, warp 0's K and warp 1's V head vectors.
  float qa[QN], qb[QN], ra[RN], rb[RN];
#pragma unroll
  for (int u = 0; u < QN; ++u) {
    const int i = threadIdx.x + u * kThreads, g = i / D, c = i % D;
    qa[u] = qb[u] = 0.f;
    if (g < G && i < GM * D) {
      if (fused) {
        const long long src = b * qin.stride + (static_cast<long long>(kh) * G + g) * D;
        qa[u] = load16(qin.qkv, src + c, qin.in_dt);
        qb[u] = load16(qin.qkv, src + (c < HALF ? c + HALF : c - HALF), qin.in_dt);
      } else {
        qa[u] = __ldcg(q + (bh0 + g) * D + c);
      }
    }
  }
  if (owner && warp < 2) {
    const long long src = b * qin.stride + (static_cast<long long>(H) + warp * KVH + kh) * D;
#pragma unroll
    for (int j = 0; j < RN; ++j) {
      const int i = lane + 32 * j;
      if (i < HALF) {
        ra[j] = load16(qin.qkv, src + i, qin.in_dt);
        rb[j] = load16(qin.qkv, src + i + HALF, qin.in_dt);
      }
    }
  }
  // q of the group's heads pre-scaled by log2(e) / sqrt(D), each of the G x D values computed once into the scores'
  // shared memory (fused: RoPE'd by rope_channel, so the same bits as rope_write's q)
  __syncthreads();   // cos_p / sin_p, written by other threads before the wait
  const float qscale = kLog2e * rsqrtf(static_cast<float>(D));
#pragma unroll
  for (int u = 0; u < QN; ++u) {
    const int i = threadIdx.x + u * kThreads, g = i / D, c = i % D;
    if (i < GM * D) {
      float v = qa[u];
      if (fused && g < G) v = rope_channel(qa[u], qb[u], cos_p[c], sin_p[c], c < HALF);
      sc[g][c] = v * qscale;
    }
  }
  // the owner CTA: warp 0 RoPEs K, warp 1 takes V, each quantizes and stores it into slot p and keeps a copy
  if (owner && warp < 2) {
    float* x = red[warp];
#pragma unroll
    for (int j = 0; j < RN; ++j) {
      const int i = lane + 32 * j;
      if (i < HALF) {
        if (warp == 0) {
          x[i] = rope_channel(ra[j], rb[j], cos_p[i], sin_p[i], true);
          x[i + HALF] = rope_channel(rb[j], ra[j], cos_p[i + HALF], sin_p[i + HALF], false);
        } else {
          x[i] = ra[j];
          x[i + HALF] = rb[j];
        }
      }
    }
    __syncwarp();
    warp_store_kv(x, D, row + p, warp == 0 ? kc : vc, warp == 0 ? ks : vs, warp == 0 ? kz : vz, qin.in_dt,
                  KIND == 4, lane, keep[warp]);
  }
  __syncthreads();
  float qr[GM][8];
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) qr[g][j] = sc[g][8 * lt + j];
  // slot p as this step left it: the owner's copy, or (unfused: rope_write, the kernel before, wrote it) reloaded
  if (pre && t0 <= p && p < t1) {
#pragma unroll
    for (int u = 0; u < kPrePasses; ++u) {
      if (t0 + u * P + slot == p) {
        kr[u] = owner ? from_keep<KIND, D>(keep[0], lt) : fetch<KIND, D>(kc, ks, kz, row + p, lt);
        vr[u] = owner ? from_keep<KIND, D>(keep[1], lt) : fetch<KIND, D>(vc, vs, vz, row + p, lt);
      }
    }
  }
  __syncthreads();   // q read before the scores loop writes sc

  // scores of this split's tokens
  auto score_pass = [&](int t, const KvRaw<KIND>& raw) {
    float part[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) part[g] = 0.f;
    if (t < t1) {
      float kv[8];
      decode8<KIND>(raw, kv);
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
  };
  if (pre) {
#pragma unroll
    for (int u = 0; u < kPrePasses; ++u)
      if (t0 + u * P < t1) score_pass(t0 + u * P + slot, kr[u]);
  } else {
#pragma unroll UNROLL
    for (int base = t0; base < t1; base += P) {
      const int t = base + slot;
      KvRaw<KIND> raw{};
      if (t < t1) raw = fetch<KIND, D>(kc, ks, kz, row + t, lt);
      score_pass(t, raw);
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
  auto value_pass = [&](int t, const KvRaw<KIND>& raw) {
    float vv[8], pr[GM];
    decode8<KIND>(raw, vv);
#pragma unroll
    for (int g = 0; g < GM; ++g) pr[g] = g < G ? sc[g][t - t0] : 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int g = 0; g < GM; ++g) acc[g][j] = fmaf(pr[g], vv[j], acc[g][j]);
  };
  if (pre) {
#pragma unroll
    for (int u = 0; u < kPrePasses; ++u)
      if (t0 + u * P + slot < t1) value_pass(t0 + u * P + slot, vr[u]);
  } else {
#pragma unroll UNROLL
    for (int base = t0; base < t1; base += P) {
      const int t = base + slot;
      if (t < t1) value_pass(t, fetch<KIND, D>(vc, vs, vz, row + t, lt));
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
  merge_splits<GM, kThreads>(ws, out, &sc[0][0], bh0, G, D, nsplit, H, static_cast<long long>(b) * KVH + kh, out_dt);
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
