// Default small-M dispatch of the fused W4A16 kernel (gemv_fused.cuh) and the problem checks.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "gemv_persist.cuh"

namespace dcc_w4a16 {

namespace {

// Benchmark override, read at every call: DCC_W4A16_LEAN="big=KIND,mid=KIND,small=KIND" replaces the kernel of the
// branches below (big: tiles >= 2 x resident 16-warp blocks; mid: between 1 and 2 rounds; small: one round). KIND:
// w4, w8, w16 (blocks of 4 / 8 / 16 warps), w4r2 (two row tiles a warp), w4u2 / w8u2 / w16u2 (two iterations in flight
// a warp), p4 / p8 / p16 (persistent grid of 4 / 8 / 16 warps a block).
enum LeanKind { kNone = -1, kW4R2, kW4U2, kW8U2, kW16U2, kW4, kW8, kW16, kP16, kP4, kP8 };

// The KIND set for `key`, kNone where the key is unset or its value unknown.
LeanKind lean_override(const char* key) {
  // longest names first where one is a prefix of another ("w4r2" before "w4"); the order of LeanKind
  static const char* const kKinds[] = {"w4r2", "w4u2", "w8u2", "w16u2", "w4", "w8", "w16", "p16", "p4", "p8"};
  const size_t n = std::strlen(key);
  for (const char* s = std::getenv("DCC_W4A16_LEAN"); s != nullptr; s = std::strchr(s, ',')) {
    if (*s == ',') ++s;
    if (std::strncmp(s, key, n) != 0 || s[n] != '=') continue;
    for (int k = 0; k < static_cast<int>(sizeof(kKinds) / sizeof(kKinds[0])); ++k) {
      const size_t m = std::strlen(kKinds[k]);
      if (std::strncmp(s + n + 1, kKinds[k], m) == 0 && (s[n + 1 + m] == ',' || s[n + 1 + m] == '\0'))
        return static_cast<LeanKind>(k);
    }
  }
  return kNone;
}

// Launches the override KIND; false where there is none or it does not fit the problem (then the default runs).
template <typename T, bool GLU>
bool launch_kind(LeanKind kind, const void* x, const void* qweight, const void* scales, const void* szeros,
                 const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
#define DCC_LK(CALL) CALL(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream); return true
  switch (kind) {
    case kW4: DCC_LK((launch_lean<T, 4, 1, 1, GLU>));
    case kW8: DCC_LK((launch_lean<T, 8, 1, 1, GLU>));
    case kW16: DCC_LK((launch_lean<T, 16, 1, 1, GLU>));
    case kW4U2: DCC_LK((launch_lean<T, 4, 2, 1, GLU>));
    case kW8U2: DCC_LK((launch_lean<T, 8, 2, 1, GLU>));
    case kW16U2: DCC_LK((launch_lean<T, 16, 2, 1, GLU>));
    case kW4R2:
      if (!lean_fits(M, N, K, 2)) return false;
      DCC_LK((launch_lean<T, 4, 1, 2, GLU>));
    case kP4: DCC_LK((launch_lean_persist<T, 4, GLU>));
    case kP8: DCC_LK((launch_lean_persist<T, 8, GLU>));
    case kP16: DCC_LK((launch_lean_persist<T, 16, GLU>));
    default: return false;
  }
#undef DCC_LK
}

// Resident blocks of the 4-warp lean kernel (gemv_lean_kernel<T, 4, 1, 1, GLU>) on the current device.
template <typename T, bool GLU>
int lean4_slots() {
  static int cached[64] = {};
  return resident_slots(gemv_lean_kernel<T, 4, 1, 1, GLU>, 128, cached);
}

// M <= 8 on full shapes (lean_fits), by row tiles (16 rows) against the resident 16-warp blocks ("slots"):
//  - at least 2 x slots: 4-warp blocks (v6) where they all fit in one wave (N = 14336 on an H100: 896 of 1056;
//    8 iterations per warp at K = 4096; DESIGN.md: 13.6-14.0 us vs 14.7 us for v7), else the persistent 16-warp grid
//    (v7: the fast decoder's fused gate_up, N = 28672, whose 1792 4-warp blocks would be 1.7 waves: 27.7 us vs
//    35.5 us alone, DESIGN.md);
//  - between 1 and 2 x slots: the persistent grid (v7);
//  - else one 16-warp block per tile (v6).
// GLU: the gate_up epilogue (gemv_fused.cuh's reduce_store), same kernel choice.
template <typename T, bool GLU>
void dispatch_lean(const void* x, const void* qweight, const void* scales, const void* szeros, const void* bias,
                   void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  const int tiles = N / 16, slots = lean_persist_slots<T, 16>();
  if (tiles >= 2 * slots) {
    if (launch_kind<T, GLU>(lean_override("big"), x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream))
      return;
    if (tiles <= lean4_slots<T, GLU>())
      return launch_lean<T, 4, 1, 1, GLU>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    return launch_lean_persist<T, 16, GLU>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
  }
  if (tiles > slots) {
    if (launch_kind<T, GLU>(lean_override("mid"), x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream))
      return;
    return launch_lean_persist<T, 16, GLU>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
  }
  if (launch_kind<T, GLU>(lean_override("small"), x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream))
    return;
  return launch_lean<T, 16, 1, 1, GLU>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
}

template <typename T>
void dispatch_fused(int mtiles, const void* x, const void* qweight, const void* scales, const void* szeros,
                    const void* bias, void* out, int M, int N, int K, int gshift, cudaStream_t stream) {
  switch (mtiles) {
    // M <= 8: GEMV v6 (gemv_lean_kernel, 16 warps, one iteration in flight per warp) where the shape has no partial
    // tiles (4-warp blocks or the persistent grid v7 when there are more row tiles than resident blocks); else v2
    // ("w16_u1_xpre" with FASTDQ). The dispatch table and its measurements: DESIGN.md.
    case 1:
      if (lean_fits(M, N, K, 1))
        return dispatch_lean<T, false>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
      return launch_fused<T, 1, 16, 1, true, true>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    // M <= 16: two B tiles, dequant_chunk (FASTDQ: the same weights with fewer instructions, DESIGN.md v2f).
    case 2:
      return launch_fused<T, 2, 8, 2, true, true>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    // M <= 32 / 64: the dequantisation of dequant_pair (FASTDQ measured no better at M = 64, DESIGN.md).
    case 4: return launch_fused<T, 4, 8, 2, false>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    case 8: return launch_fused<T, 8, 8, 2, false>(x, qweight, scales, szeros, bias, out, M, N, K, gshift, stream);
    default: throw std::invalid_argument("dcc w4a16: mtiles must be 1, 2, 4 or 8");
  }
}

}  // namespace

void check_problem(int M, int N, int K, int group_size) {
  log2_group(group_size);
  if (M < 0 || N <= 0 || K <= 0) throw std::invalid_argument("dcc w4a16: empty or negative shape");
  if (N % 4) throw std::invalid_argument("dcc w4a16: N = " + std::to_string(N) + " is not a multiple of 4");
  if (K % 64) throw std::invalid_argument("dcc w4a16: K = " + std::to_string(K) + " is not a multiple of 64");
  if (K % group_size)
    throw std::invalid_argument("dcc w4a16: K = " + std::to_string(K) + " is not a multiple of the group size");
}

int check_gemv_call(int M, int N, int K, int group_size, const void* x, const void* qweight) {
  check_problem(M, N, K, group_size);
  check_aligned(x, "x");
  check_aligned(qweight, "qweight");
  return log2_group(group_size);
}

void gemv(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros,
          const void* bias, void* out, int M, int N, int K, int group_size, int mtiles, cudaStream_t stream) {
  const int gshift = check_gemv_call(M, N, K, group_size, x, qweight);
  if (M == 0) return;
  if (mtiles == 0) mtiles = M <= 8 ? 1 : (M <= 16 ? 2 : (M <= 32 ? 4 : 8));
  if (dt == DType::kFloat16)
    dispatch_fused<__half>(mtiles, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
  else
    dispatch_fused<__nv_bfloat16>(mtiles, x, qweight, scales, scaled_zeros, bias, out, M, N, K, gshift, stream);
}

bool gemv_glu_fits(int M, int N, int K) { return lean_fits(M, N, K, 1); }

void gemv_glu(DType dt, const void* x, const void* qweight, const void* scales, const void* scaled_zeros, void* out,
              int M, int N, int K, int group_size, cudaStream_t stream) {
  const int gshift = check_gemv_call(M, N, K, group_size, x, qweight);
  if (M == 0) return;
  if (!gemv_glu_fits(M, N, K))
    throw std::invalid_argument("dcc w4a16: the gate_up GEMV (glu) needs M <= 8, K % 128 == 0 and N % 16 == 0, got "
                                "M = " + std::to_string(M) + ", N = " + std::to_string(N) +
                                ", K = " + std::to_string(K));
  if (dt == DType::kFloat16)
    dispatch_lean<__half, true>(x, qweight, scales, scaled_zeros, nullptr, out, M, N, K, gshift, stream);
  else
    dispatch_lean<__nv_bfloat16, true>(x, qweight, scales, scaled_zeros, nullptr, out, M, N, K, gshift, stream);
}

}  // namespace dcc_w4a16
