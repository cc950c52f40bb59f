"""Test oracle: QServe's kernels emulated one instruction at a time, written from the source and SASS independently of
dcc.targets.qserve (numpy float32 scalars for FMUL / FADD / conversions, exact rationals for the FFMA).

Source: mit-han-lab/qserve de6a2ec, built as kernels/setup.py does (--use_fast_math), disassembled for sm_90 after
nvcc 13.0:
- w4a8_per_chn/gemm_cuda.cu   `psums.x = psums.x * wscale.x * ascale - w_sz.x * a_ssum;` ->
      I2FP.F32.S32 p; FMUL.FTZ t1 = wscale * p; FMUL.FTZ t2 = w_sz * a_ssum; FFMA.FTZ o = ascale * t1 - t2;
      F2FP.F16.F32.PACK_AB (round to nearest even)
- w4a8_per_group/gemm_cuda.cu and w8a8/w8a8_gemm_cuda.cu   `psums.x *= wscale.x * ascale;` ->
      I2FP.F32.S32 p; FMUL.FTZ s = wscale * ascale; FMUL.FTZ o = p * s; F2FP
- fused_kernels.cu quant_kernel_fuse_sum (per token, blockDim = min(K, 1024)):
      sum: per thread `sum_val += val` over i = tid, tid + B, ...; blockReduceSum (xor butterfly 16..1 per warp, then
      over the warp sums); input_sum = __float2half_rn(sum)
      scale = __float2half_rn(amax / 127.0f)  -> FMUL.FTZ amax * 0x3C010204 (fp32 1/127); F2FP
      codes = cvt.rni.sat.s8.f32(x * (127.0f / amax)) -> MUFU.RCP r = 1/amax; FMUL.FTZ i = r * 127; FMUL x * i; F2I.S8
  MUFU.RCP is approximate (<= 1 ulp); `rcp` below is the correctly rounded reciprocal, a stand-in.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

F32 = np.float32


def round_f32(v: Fraction) -> np.float32:
    """An exact rational rounded once to float32 (nearest, ties to even; subnormal spacing below 2^-126)."""
    if v == 0:
        return F32(0.0)
    sign, a = (-1 if v < 0 else 1), abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1                                            # now 2^e <= a < 2^(e+1)
    q = Fraction(2) ** (max(e, -126) - 23)
    r = a / q
    n = r.numerator // r.denominator
    rem = r - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    return F32(sign * float(n * q))


def ffma(a, b, c) -> np.float32:
    """FFMA: a * b + c (float32 values) with a single rounding."""
    return round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def epilogue_per_channel(psum: np.ndarray, s1: np.ndarray, sz: np.ndarray, ascale: np.ndarray,
                         asum: np.ndarray) -> np.ndarray:
    """fp16 [T, N] from int64 psum [T, N], fp16 s1/sz [N], fp16 ascale/asum [T]."""
    t, n = psum.shape
    out = np.empty((t, n), dtype=np.float16)
    for i in range(t):
        a, am = F32(ascale[i]), F32(asum[i])
        for j in range(n):
            t1 = F32(s1[j]) * F32(psum[i, j])             # I2FP (round to nearest) then FMUL
            t2 = F32(sz[j]) * am
            out[i, j] = np.float16(ffma(a, t1, -t2))
    return out


def epilogue_scaled(psum: np.ndarray, s1: np.ndarray, ascale: np.ndarray) -> np.ndarray:
    """fp16 [T, N]: the g128 / W8A8 epilogue."""
    s = F32(1.0) * s1.astype(F32)[None, :] * ascale.astype(F32)[:, None]   # wscale * ascale, exact in float32
    return (psum.astype(F32) * s).astype(np.float16)


def token_sum(x16: np.ndarray, threads: int = 1024) -> np.ndarray:
    """fp16 [T]: quant_kernel_fuse_sum's input_sum, thread by thread and lane by lane (K % 32 == 0)."""
    t, k = x16.shape
    b = min(k, threads)
    out = np.empty(t, dtype=np.float16)
    for r in range(t):
        x = x16[r].astype(F32)
        part = np.zeros(b, dtype=F32)
        for tid in range(b):
            s = F32(0.0)
            for i in range(tid, k, b):
                s = F32(s + x[i])
            part[tid] = s

        def warp_reduce(v):                               # every lane of warpReduceSum, xor shuffles
            v = v.copy()
            for mask in (16, 8, 4, 2, 1):
                v = np.array([F32(v[lane] + v[lane ^ mask]) for lane in range(32)], dtype=F32)
            return v[0]

        warps = [warp_reduce(part[w * 32:(w + 1) * 32]) for w in range(b // 32)]
        second = np.array([warps[lane] if lane < b / 32 else F32(0.0) for lane in range(32)], dtype=F32)
        out[r] = np.float16(warp_reduce(second))
    return out


def quantize(x16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [T, K] as int64, fp16 scale [T]) of fp16 activations, per token."""
    xf = x16.astype(F32)
    amax = np.abs(xf).max(axis=1)
    scale = (amax * F32(1.0 / 127.0)).astype(F32).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        rcp = (F32(1.0) / amax).astype(F32)              # MUFU.RCP stand-in
        inv = (rcp * F32(127.0)).astype(F32)
        prod = (xf * inv[:, None]).astype(F32)
    codes = np.clip(np.rint(np.nan_to_num(prod, nan=0.0)), -128, 127).astype(np.int64)   # cvt.rni.sat, NaN -> 0
    return codes, scale
