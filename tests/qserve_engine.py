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
- layernorm_kernels.cu generalLayerNorm[_fuse_sum]<half> (rms_norm_general[_fuse_sum], beta = nullptr, one CTA of
  32 * ceil(min(H, 1024) / 32) threads per token): a layer norm (the mean is subtracted) --
      S = sum of x (per thread FADD, then blockReduceSum); mean = FMUL(S, MUFU.RCP(H))
      V = sum of FFMA(d, d, acc), d = FADD(x, -mean); rs = MUFU.RSQ(FFMA(V, MUFU.RCP(H), eps))
      y = FMUL(FMUL(d, rs), gamma); h = F2FP(y); per thread: amax = max |h| from fp16(1e-6), sum = HADD(sum, h)
      A = blockAllReduceMax, Ssum = blockAllReduceSum (float32); codes = F2I.S8(FMUL(FMUL(MUFU.RCP(A), 127), y))
      scale = F2FP(FMUL(A, fp32(1/127))); input_sum = F2FP(Ssum)
- activation_kernels.cu silu_and_mul_kernel<at::Half>: s = F2FP(FMUL(g, MUFU.RCP(FADD(MUFU.EX2(FMUL(-g, log2e)),
  1)))); out = F2FP(FMUL(s, u)).
  MUFU.RSQ and MUFU.EX2 stand-ins below are correctly rounded (60-digit decimal arithmetic, then one rounding).
"""
from __future__ import annotations

from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np

F32 = np.float32


def _round(v: Fraction, mant: int, emin: int, emax: int) -> float:
    """An exact rational rounded once to a binary format (mant fraction bits, normal exponents emin..emax): nearest,
    ties to even, subnormal spacing below 2^emin, +-inf past the largest finite value."""
    if v == 0:
        return 0.0
    sign, a = (-1 if v < 0 else 1), abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1                                            # now 2^e <= a < 2^(e+1)
    q = Fraction(2) ** (max(e, emin) - mant)
    r = a / q
    n = r.numerator // r.denominator
    rem = r - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    out = n * q
    if out >= Fraction(2) ** (emax + 1):
        return sign * float("inf")
    return sign * float(out)


def round_f32(v: Fraction) -> np.float32:
    """An exact rational rounded once to float32."""
    return F32(_round(v, 23, -126, 127))


def round_f16(v: Fraction) -> np.float16:
    """An exact rational rounded once to fp16."""
    return np.float16(_round(v, 10, -14, 15))


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


def warp_reduce(v) -> np.float32:
    """warpReduceSum: every lane adds the lane `mask` away (xor), masks 16, 8, 4, 2, 1; lane 0's value."""
    v = np.array(v, dtype=F32)
    for mask in (16, 8, 4, 2, 1):
        v = np.array([F32(v[lane] + v[lane ^ mask]) for lane in range(32)], dtype=F32)
    return v[0]


def block_reduce(part) -> np.float32:
    """blockReduceSum as thread 0 sees it, for per-thread values `part` (len = blockDim): each warp's lanes, then
    the warp sums in the first warp (lanes past blockDim / 32 read 0)."""
    b = len(part)
    padded = list(part) + [F32(0.0)] * (-b % 32)
    warps = [warp_reduce(padded[w * 32:(w + 1) * 32]) for w in range(len(padded) // 32)]
    return warp_reduce([warps[lane] if lane < b / 32 else F32(0.0) for lane in range(32)])


def token_sum(x16: np.ndarray, threads: int = 1024) -> np.ndarray:
    """fp16 [T]: quant_kernel_fuse_sum's input_sum, thread by thread and lane by lane (K % 32 == 0)."""
    t, k = x16.shape
    b = min(k, threads)
    out = np.empty(t, dtype=np.float16)
    for r in range(t):
        x = x16[r].astype(F32)
        part = []
        for tid in range(b):
            s = F32(0.0)
            for i in range(tid, k, b):
                s = F32(s + x[i])
            part.append(s)
        out[r] = np.float16(block_reduce(part))
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


def rcp(v) -> np.float32:
    """MUFU.RCP stand-in: 1 / v rounded once to float32 (v finite and nonzero; +-inf gives +-0)."""
    if np.isinf(v):
        return F32(0.0) * F32(np.sign(v))
    return round_f32(1 / Fraction(float(v)))


def rsq(v) -> np.float32:
    """MUFU.RSQ stand-in: 1 / sqrt(v) (v > 0), 60 decimal digits, then rounded once to float32."""
    with localcontext() as ctx:
        ctx.prec = 60
        return round_f32(Fraction(1 / Decimal(float(v)).sqrt()))


def ex2(v) -> np.float32:
    """MUFU.EX2 stand-in: 2^v, 60 decimal digits, then rounded once to float32 (2^128 and up overflow)."""
    v = float(v)
    if v >= 128:
        return F32(np.inf)
    if v < -160:
        return F32(0.0)
    with localcontext() as ctx:
        ctx.prec = 60
        return round_f32(Fraction(Decimal(2) ** Decimal(v)))


def layernorm_quant(x16: np.ndarray, g16: np.ndarray, eps: float, with_sum: bool = True):
    """(codes [T, H] int64, scale fp16 [T], input_sum fp16 [T] or None, h fp16 [T, H]) of generalLayerNorm[_fuse_sum]
    on fp16 x [T, H] with the fp16 weight g [H], every thread's loop and every butterfly emulated."""
    t, h = x16.shape
    b = 32 * -(-min(h, 1024) // 32)
    inv_h = rcp(F32(h))                                   # I2FP then MUFU.RCP
    eps32 = F32(eps)
    start = np.float16(np.float32(1e-6))                  # T_scalar amax = 1e-6f
    g = g16.astype(F32)
    codes = np.empty((t, h), dtype=np.int64)
    scale = np.empty(t, dtype=np.float16)
    total = np.empty(t, dtype=np.float16) if with_sum else None
    hh = np.empty((t, h), dtype=np.float16)
    for r in range(t):
        x = x16[r].astype(F32)
        threads = [range(tid, h, b) for tid in range(b)]
        part = []
        for idx in threads:
            s = F32(0.0)
            for i in idx:
                s = F32(x[i] + s)
            part.append(s)
        mean = F32(block_reduce(part) * inv_h)
        d = np.array([F32(x[i] - mean) for i in range(h)], dtype=F32)
        part = []
        for idx in threads:
            v = F32(0.0)
            for i in idx:
                v = ffma(d[i], d[i], v)
            part.append(v)
        rs = rsq(ffma(block_reduce(part), inv_h, eps32))
        y = np.array([F32(F32(d[i] * rs) * g[i]) for i in range(h)], dtype=F32)
        hh[r] = y.astype(np.float16)
        amaxes, sums = [], []
        for idx in threads:
            a, s = start, np.float16(0.0)
            for i in idx:
                a = max(a, abs(hh[r, i]))
                s = round_f16(Fraction(float(s)) + Fraction(float(hh[r, i])))   # HADD: one fp16 rounding
            amaxes.append(F32(a))
            sums.append(F32(s))
        amax = max(amaxes)
        inv = F32(rcp(amax) * F32(127.0))
        with np.errstate(invalid="ignore"):
            prod = (inv * y).astype(F32)
        codes[r] = np.clip(np.rint(np.nan_to_num(prod, nan=0.0)), -128, 127).astype(np.int64)
        scale[r] = np.float16(F32(amax * F32(1.0 / 127.0)))
        if with_sum:
            total[r] = np.float16(block_reduce(sums))
    return codes, scale, total, hh


def silu_and_mul(g16: np.ndarray, u16: np.ndarray) -> np.ndarray:
    """fp16 output of silu_and_mul_kernel for fp16 gate and up of one shape, element by element."""
    out = np.empty(g16.shape, dtype=np.float16)
    log2e = F32(1.0 / np.log(2.0))
    for idx in np.ndindex(g16.shape):
        g = F32(g16[idx])
        e = ex2(F32(-g * log2e))
        with np.errstate(over="ignore"):                 # a product past 65504 is an fp16 inf, as on the GPU
            s = np.float16(F32(g * rcp(F32(e + F32(1.0)))))
            out[idx] = np.float16(F32(F32(s) * F32(u16[idx])))
    return out
