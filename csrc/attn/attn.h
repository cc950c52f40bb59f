// Host API of csrc/attn (module dcc_attn_ext): the fast decoder's fused ops (dcc/runtime/fastlm). Raw device
// pointers and a stream; dtype codes 0 = fp16, 1 = bf16, 2 = float32. Numerics in DESIGN.md.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dcc_attn {

// h [M, H] float32 += delta (16-bit, may be null); out = norm ? RMSNorm(h) * w : h, in dtype dt (w in dt).
cudaError_t add_rmsnorm(float* h, const void* delta, const void* w, void* out, int M, int H, float eps, int dt,
                        int norm, cudaStream_t stream);

// out [M, I] = SiLU(gate) * up, gate = gu[m, 0:I], up = gu[m, I:2I] (row stride in elements), dtype dt; block > 0
// (I % block == 0): gate and up interleaved in blocks of that many columns instead (gate first), as csrc/w4a16's
// gate_up layout for gemv_glu stores them.
cudaError_t silu_mul(const void* gu, void* out, int M, int I, long long stride, int block, int dt,
                     cudaStream_t stream);

// One decode token per sequence: qkv [B, stride] (q heads, then k heads, then v heads; dtype in_dt) at positions
// pos [B] (int64): RoPE (cos/sin float32 [P, D]) on q and k; q_out [B, H, D] in q_dt; K/V into slot pos[b] of the
// cache: kv4 = 0: kc/vc [B, KVH, T, D] in in_dt (ks..vz unused); kv4 = 1: codes uint8 [B, KVH, T, D/2], fp16
// scale/zero [B, KVH, T].
cudaError_t rope_write(const void* qkv, long long stride, const float* cos, const float* sin, const long long* pos,
                       void* q_out, void* kc, void* ks, void* kz, void* vc, void* vs, void* vz, int B, int H, int KVH,
                       int D, int T, int in_dt, int q_dt, int kv4, cudaStream_t stream);

// A prefill's rows: qkv [B * S, stride] (layout and dtype as rope_write's), sequence-major -- row r is the token at
// position r % S of sequence r / S (positions 0..S-1; S <= T, and cos/sin hold at least S positions). RoPE on q and
// k; q_out [B * S, H, D] in q_dt; K/V into slots 0..S-1 of the cache (layout as rope_write's). kv4 = 1 and kd/vd
// non-null: also the K/V the stored codes read back as, fp16 [B, KVH, S, D] (ref_ops.kv4_dequantize of them: the
// prefill attention's inputs); kd/vd must be null otherwise (a 16-bit cache's slots 0..S-1 are the inputs).
cudaError_t rope_write_rows(const void* qkv, long long stride, const float* cos, const float* sin, void* q_out,
                            void* kc, void* ks, void* kz, void* vc, void* vs, void* vz, void* kd, void* vd, int B,
                            int S, int H, int KVH, int D, int T, int in_dt, int q_dt, int kv4, cudaStream_t stream);

// softmax(q K^T / sqrt(D)) V over slots 0..pos[b] of one layer's cache -> out [B, H, D] in out_dt. kv = 4: QServe's
// KV4 cache (codes uint8 [B, KVH, T, D/2], fp16 scale/zero [B, KVH, T]); kv = 0 / 1: a 16-bit cache (fp16 / bf16
// [B, KVH, T, D]; ks..vz unused). Either q float32 [B, H, D] (RoPE'd, the step's K/V already in the cache:
// rope_write) and qkv null, or (fused) q null and the step's qkv row [B, stride] (dtype in_dt; a 16-bit cache has
// the same dtype) with the RoPE tables: the kernel RoPEs q, and writes the step's K/V into slot pos[b] as rope_write
// does. GQA: H / KVH <= 8 query heads per KV head; D / 8 a power of two <= 32. chunk (<= 256) tokens per block,
// nsplit blocks per (sequence, KV head), chunk * nsplit >= T; nsplit > 1 uses ws (16-byte aligned): B * H * nsplit *
// (D + 2) floats of partials, then B * KVH int32 arrival counters that must be zero on entry (the merging CTA resets
// its counter, so a buffer zeroed once serves every launch).
cudaError_t decode_attention(const float* q, const void* qkv, long long stride, const float* cos, const float* sin,
                             int in_dt, void* kc, void* ks, void* kz, void* vc, void* vs, void* vz,
                             const long long* pos, void* out, float* ws, int B, int H, int KVH, int D, int T, int chunk,
                             int nsplit, int kv, int out_dt, cudaStream_t stream);

}  // namespace dcc_attn
