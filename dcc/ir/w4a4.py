"""Nunchaku's W4A4 (SVDQuant) run-time activation quantization, simulated exactly on the CPU: the INT4 path (signed
s4 codes, or unsigned u4 codes after the GELU shift, per 64-k group, 16-bit scale), the NVFP4 path (e2m1 codes per
16-k group with an e4m3 micro-scale), and the 16-bit arithmetic primitives (exact round-to-nearest-even to fp16/bf16,
the single-rounding __hfma2, __fdividef, rcp.approx.ftz) that the GEMM reference in dcc/targets/nunchaku builds on.

Follows nunchaku-ai/nunchaku @ 92e4695 (src/kernels is byte-identical to mit-han-lab/nunchaku @ 4132b3b):
  - src/kernels/zgemm/gemm_w4a4.cuh: quantize_w4a4_from_fpsum_warp (INT4), quantize_w4a4_fp4_from_fpsum_warp (NVFP4),
    EpilogueQuantize (shift, then division by smooth, then quantization), quantize_w4a4_fuse_lora_kernel.
  - src/kernels/zgemm/gemm_utils.cuh: h2div, cuda_frcp, quantize_float2<4, *>, quantize_float2_fp4,
    quantize_float4_fp8.
  - src/kernels/zgemm/gemm_w4a4_launch_impl.cuh: SHIFT_GELU and who applies it.

The input path, in the kernel's order (16-bit = the model's fp16 or bf16 compute dtype, "dtype" below):
  1. x arrives in 16 bits.
  2. Only in the fused fc1 -> GELU -> fc2 path (INT4): + SHIFT_GELU as a 16-bit __hadd2. This is done by fc1's GEMM
     epilogue (EpilogueQuantize with USE_UNSIGNED = !USE_FP4 and shift_value = SHIFT_GELU); the standalone quantize
     kernel (quantize_w4a4_act_fuse_lora, used for every other layer) always passes shift 0 and quantizes signed.
     NVFP4 uses shift 0 and signed codes in both paths.
  3. h2div(x, smooth): both widened to fp32, divided with __fdividef (div.approx.f32 = x * rcp(smooth)), and the
     quotient rounded back to 16 bits (float22half2 = __float22half2_rn / __float22bfloat162_rn, RNE).
  4. Per row and group: amax = max |x| of the 16-bit values (exact).
     INT4: scale = fp32(amax * fp32(1/7)) (1/15 unsigned); the stored activation scale is the 16-bit RNE of it, but
     the codes use rscale = rcp.approx.ftz.f32(scale) of the unrounded fp32 scale: code = cvt.pack.sat.s4 (u4) of
     cvt.rni.s32.f32(fp32(x * rscale)) -- round half to even, then saturate to [-8, 7] ([0, 15]).
     NVFP4: scale = fminf(fp32(amax * fp32(1/6)), 448); stored micro-scale = cvt.rn.satfinite.e4m3 of it; codes =
     cvt.rn.satfinite.e2m1 of fp32(x * rcp.approx.ftz(scale)) (again from the fp32 scale, not the rounded e4m3).

Residual differences from the GPU (documented, not emulable bit for bit in torch):
  - rcp.approx.f32 (MUFU.RCP) is specified to within 1 ulp, not correctly rounded; it is emulated by the correctly
    rounded fp32 1/x. A code can differ only when fp32(x * rscale) lies within about one fp32 ulp of a .5 rounding
    boundary (research/targets.md section 4 measured 99.95% of real codes equal to a plain round(x / smooth / scale)).
    The same holds for __fdividef's reciprocal, whose error then has to survive the rounding to 16 bits (a quotient
    within ~2 fp32 ulps of a 16-bit rounding midpoint: about 5e-4 of fp16 and 6e-5 of bf16 elements at most).
  - div.approx.f32 returns 0 for 2^126 < |smooth| < 2^128; smooth factors never get there, so it is not modelled.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .formats import fp_decode, fp_encode, round_to_fp

SHIFT_GELU = 0.171875   # 11/64, exact in fp16 and bf16 (gemm_w4a4_launch_impl.cuh, `SHIFT_GELU`)
INT4_GROUP = 64         # WARP_K = INSN_K = 64: the INT4 kernel's only activation/weight group size
NVFP4_GROUP = 16        # four 16-k micro-scale groups per 64-k mma (scale_vec::4X)
NVFP4_SCALE_MAX = 448.0  # MSCALE_MAX: the fp32 micro-scale is clamped here before its e4m3 conversion
SIXTEEN_BIT = (torch.float16, torch.bfloat16)

# (mantissa bits, exponent of the smallest normal, largest finite) of the formats rounded to exactly below
_FMT = {torch.float16: (10, -14, 65504.0),
        torch.bfloat16: (7, -126, float(torch.finfo(torch.bfloat16).max)),
        torch.float32: (23, -126, float(torch.finfo(torch.float32).max))}


# ------------------------------------------------------------------------------------- exact 16-bit arithmetic

def compute_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The kernel's 16-bit dtype: `dtype` if given, else x's dtype if that is fp16/bf16, else bf16."""
    if dtype is None:
        dtype = x.dtype if x.dtype in SIXTEEN_BIT else torch.bfloat16
    if dtype not in SIXTEEN_BIT:
        raise ValueError(f"Nunchaku computes in float16 or bfloat16, got {dtype}")
    return dtype


def round_exact(x: torch.Tensor, dtype: torch.dtype, sticky: torch.Tensor | None = None) -> torch.Tensor:
    """Round float64 values to fp16/bf16/fp32 with IEEE round-to-nearest-even in one step; returned as float64.

    torch's own float64 -> float16/bfloat16 cast goes through float32 and can round twice (1 + 2^-11 + 2^-40 becomes 1,
    not 1 + 2^-10), so this rounds to float32 with round-to-odd first (16-bit dtypes) or from the float64 exponent
    directly (float32). Subnormals keep the spacing of the smallest normal;
    magnitudes that round above the largest finite value become +-inf (as the hardware conversions do); NaN stays NaN.
    sticky: the exact remainder (true value = x + sticky, |sticky| <= half an ulp of x in float64, as TwoSum gives);
    it decides the direction when x itself falls exactly halfway between two representable values.
    """
    if dtype in SIXTEEN_BIT:
        return _round16_via_odd(x.to(torch.float64), dtype, sticky)
    return round_by_exponent(x, dtype, sticky)


def round_by_exponent(x: torch.Tensor, dtype: torch.dtype, sticky: torch.Tensor | None = None) -> torch.Tensor:
    """round_exact the direct way, for any of the three dtypes: the value scaled by its quantum (from frexp), rounded
    half to even, the sticky remainder breaking exact ties (the float32 route, and the 16-bit route's check)."""
    mbits, emin, fmax = _FMT[dtype]
    xd = x.to(torch.float64)
    a = xd.abs()
    _, e = torch.frexp(a)                                     # a = m * 2^e, m in [0.5, 1)
    e = (e - 1).clamp(min=emin)                               # below the normal range the spacing stays fixed
    quantum = torch.ldexp(torch.ones_like(a), (e - mbits).to(torch.float64))
    r = a / quantum                                           # exact: power-of-two scaling
    rounded = torch.round(r)                                  # half to even
    if sticky is not None:
        tie = (r - torch.floor(r) == 0.5) & (sticky != 0)
        away = sticky * torch.sign(xd) > 0                    # the true value lies beyond the tie, away from zero
        rounded = torch.where(tie, torch.where(away, torch.ceil(r), torch.floor(r)), rounded)
    out = rounded * quantum
    out = torch.where(out > fmax, torch.full_like(out, float("inf")), out)
    out = torch.copysign(out, xd)
    return torch.where(torch.isnan(xd), xd, out)


def _round16_via_odd(xd: torch.Tensor, dtype: torch.dtype, sticky: torch.Tensor | None) -> torch.Tensor:
    """round_exact to fp16/bf16 by way of float32 rounded to odd: the true value (xd + sticky) rounded to float32
    with round-to-odd (an inexact result takes the neighbour whose last bit is 1), then torch's RNE cast to the 16-bit
    dtype. Rounding to odd at p + 2 or more bits and then to nearest-even at p bits is one correct rounding (Boldo and
    Melquiond, 2008); float32 has 24 bits against 11 (fp16) and 8 (bf16), and covers both dtypes' exponent ranges
    (bf16 subnormals are float32 subnormals: the float32 quantum there is bf16's own, and float32 subnormals below
    2^-126 are left to the RNE cast, which is exact on them). Casts and bit tests only: the same bits as
    round_by_exponent (tested), and the INT4 group accumulation of a [512, 1536] x [576, 1536] layer 1.6x faster."""
    t = xd.to(torch.float32)                                     # RNE to float32
    # the exact remainder of that rounding, then the sticky part: its sign says on which side the true value lies
    rem = (xd - t.to(torch.float64))                             # exact: t is xd rounded to 24 bits
    if sticky is not None:
        rem = torch.where(rem == 0, sticky, rem)
    even = (t.view(torch.int32) & 1) == 0
    fix = (rem != 0) & even & torch.isfinite(t)
    toward = torch.where(rem > 0, torch.full_like(t, float("inf")), torch.full_like(t, float("-inf")))
    t = torch.where(fix, torch.nextafter(t, toward), t)
    out = t.to(dtype).to(torch.float64)
    return torch.where(torch.isnan(xd), xd, out)


def _two_sum(p: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s + err == p + c exactly (Knuth's TwoSum in float64)."""
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    return s, torch.where(torch.isfinite(s), err, torch.zeros_like(err))


def add_exact(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """__hadd2 (or an fp32 add): a + b rounded once to dtype. a, b hold dtype values (any float tensor)."""
    s, err = _two_sum(a.to(torch.float64), b.to(torch.float64))
    return round_exact(s, dtype, err)


def mul_exact(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """__hmul2 (or an fp32 multiply): a * b rounded once. The float64 product of two <= 24-bit values is exact."""
    return round_exact(a.to(torch.float64) * b.to(torch.float64), dtype)


def fma_exact(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """__hfma2 (fma.rn.f16x2 / fma.rn.bf16x2): a * b + c with a single rounding to dtype; a, b, c hold dtype values.
    The product of two 16-bit values is exact in float64 and TwoSum keeps the sum's remainder, so the rounding is
    exact."""
    s, err = _two_sum(a.to(torch.float64) * b.to(torch.float64), c.to(torch.float64))
    return round_exact(s, dtype, err)


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded once (RNE) to dtype and returned in dtype (a no-op when x is already in dtype). From float32 (or
    the other 16-bit dtype, exact in float32) torch's own cast is that single RNE; only float64 needs round_exact."""
    if x.dtype == dtype:
        return x
    if x.dtype in (torch.float32, *SIXTEEN_BIT) and dtype in SIXTEEN_BIT:
        return x.to(torch.float32).to(dtype)
    return round_exact(x, dtype).to(dtype)


def rcp_approx_ftz(scale: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 (cuda_frcp): fp32 1/x, with subnormal inputs flushed to zero first, so their reciprocal is
    +-inf (and 1/0 = +inf). The correctly rounded 1/x stands in for MUFU.RCP's <= 1 ulp approximation."""
    s = scale.to(torch.float32)
    s = torch.where(s.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(s), s)
    return torch.ones_like(s) / s


def smooth_divide(x16: torch.Tensor, smooth: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """h2div(x, smooth) in dtype: __fdividef on the fp32 widenings, i.e. div.approx.f32 = x * (1/smooth) with both
    fp32 steps rounded, then the quotient rounded (RNE) back to 16 bits. smooth None means ones (x unchanged)."""
    if smooth is None:
        return to_dtype(x16, dtype)
    s = to_dtype(smooth, dtype).to(torch.float32)
    q = x16.to(torch.float32) * (torch.ones_like(s) / s)     # two fp32 roundings, as div.approx computes it
    return q.to(dtype)                                        # fp32 -> 16 bits: a single RNE in torch


def _recip_const(qmax: float) -> torch.Tensor:
    """The kernel's compile-time `1 / QVALUE_MAX` (QVALUE_MAX a float): the fp32 RNE of 1/qmax."""
    return torch.tensor(1.0, dtype=torch.float32) / torch.tensor(qmax, dtype=torch.float32)


def _grouped(v: torch.Tensor, group: int) -> torch.Tensor:
    k = v.shape[-1]
    if group <= 0 or k % group:
        raise ValueError(f"group size {group} must divide the input features {k}")
    return v.reshape(*v.shape[:-1], k // group, group)


def _prepare(x: torch.Tensor, smooth: torch.Tensor | None, dtype: torch.dtype, shift: float) -> torch.Tensor:
    """The 16-bit values the quantizer groups: x in dtype, + shift (16-bit add) if any, then / smooth (h2div)."""
    v = to_dtype(x, dtype)
    if smooth is not None and smooth.shape[-1] != v.shape[-1]:
        raise ValueError(f"smooth has {smooth.shape[-1]} entries, the input has {v.shape[-1]} features")
    if shift:
        v = add_exact(v, torch.full_like(v, shift, dtype=torch.float64), dtype).to(dtype)
    return smooth_divide(v, smooth, dtype)


# ------------------------------------------------------------------------------------------------------- INT4

class Int4Act(NamedTuple):
    """One quantized activation: codes int8 [..., K] (s4 in [-8, 7], or u4 in [0, 15]) and scales [..., K / group]
    in the 16-bit dtype. What the GEMM multiplies is codes * scales per group."""
    codes: torch.Tensor
    scales: torch.Tensor
    unsigned: bool

    @property
    def group(self) -> int:
        return self.codes.shape[-1] // self.scales.shape[-1]

    def dequantize(self) -> torch.Tensor:
        """codes * scale in float32 (exact: a 4-bit integer times a 16-bit scale)."""
        g = _grouped(self.codes.to(torch.float32), self.group)
        return (g * self.scales.to(torch.float32).unsqueeze(-1)).reshape(self.codes.shape)


def int4_codes(v: torch.Tensor, unsigned: bool = False) -> torch.Tensor:
    """quantize_float2<4, unsigned>: cvt.rni.s32.f32 (round half to even; NaN -> 0; +-inf and out-of-range values
    saturate to the int32 limits), then cvt.pack.sat.s4.s32 / .u4.s32 (saturate to [-8, 7] / [0, 15]). int8 out."""
    r = torch.round(v.to(torch.float32))
    r = torch.nan_to_num(r, nan=0.0, posinf=2.0 ** 31 - 1, neginf=-(2.0 ** 31))
    lo, hi = (0, 15) if unsigned else (-8, 7)
    return r.clamp(lo, hi).to(torch.int8)


def quantize_act_int4(x: torch.Tensor, smooth: torch.Tensor | None = None, group: int = INT4_GROUP,
                      unsigned: bool = False, dtype: torch.dtype | None = None,
                      shift: float | None = None) -> Int4Act:
    """What Nunchaku's INT4 path makes of an activation x [..., K] (see the module docstring for the steps).

    unsigned=False: quantize_w4a4_act_fuse_lora (every layer fed by a plain 16-bit tensor): (x / smooth) -> s4.
    unsigned=True: the input of an `act_unsigned` layer (mlp_fc2 after GELU), as fc1's fused epilogue quantizes it:
    (x + SHIFT_GELU) / smooth -> u4, where x is the GELU output (the shift is a 16-bit add before the division).
    smooth: [K] (any dtype; rounded to the 16-bit dtype as the checkpoint stores it), or None for no smoothing.
    An all-zero group gets scale 0 and codes 0 (rcp(0) = inf, 0 * inf = NaN, and cvt.rni turns NaN into 0).
    A bf16 group whose fp32 scale is subnormal (amax < 7 * 2^-126) has its reciprocal flushed to +inf by the ftz
    rcp, so its nonzero values saturate to 7 / -8 (15 / 0 unsigned), while the stored bf16 scale stays tiny.
    The kernel only supports group 64; other sizes apply the same rule per group, for experiments.
    shift: the value added before the division (default SHIFT_GELU when unsigned, else 0); 0 with unsigned=True
    quantizes an input that is already shifted (the dcc::quant_act_int4 op: its graph holds the shift as a node).
    """
    dtype = compute_dtype(x, dtype)
    v = _prepare(x, smooth, dtype, (SHIFT_GELU if unsigned else 0.0) if shift is None else shift)
    g = _grouped(v.to(torch.float32), group)                  # 16-bit values widened: exact
    amax = g.abs().amax(-1)                                   # __hmax of |x|: exact
    scale = amax * _recip_const(15.0 if unsigned else 7.0)    # fp32 multiply by the fp32 constant 1/qmax
    rscale = rcp_approx_ftz(scale)                            # from the fp32 scale, not the stored 16-bit one
    codes = int4_codes(g * rscale.unsqueeze(-1), unsigned)    # fp32 product, then rni + saturating pack
    return Int4Act(codes.reshape(v.shape), scale.to(dtype), unsigned)   # stored scale: fp32 -> 16-bit RNE


def fake_quantize_act_int4(x: torch.Tensor, smooth: torch.Tensor | None = None, group: int = INT4_GROUP,
                           unsigned: bool = False, dtype: torch.dtype | None = None, unsmooth: bool = False,
                           out_dtype: torch.dtype | None = None, shift: float | None = None) -> torch.Tensor:
    """What the INT4 GEMM's main branch sees of x: codes * ascale, in out_dtype (default x's dtype; a bf16 output
    rounds codes * scale to 8 bits of mantissa, pass float32 to keep it exact).

    By default the result stays in the smoothed (and, unsigned, shifted) domain: it is what multiplies the stored
    weight, which DeepCompressor saves pre-multiplied by smooth (model.pt holds W * smooth; backend/nunchaku/convert.py
    @ 69f3473 packs it without touching smooth), so fake_x @ (W * smooth)^T reproduces the main branch.
    unsmooth=True maps it back to x's domain for calibration against the original weight: codes * ascale * smooth
    (fp32), minus the shift for unsigned, so the result is directly comparable with x. shift as for
    quantize_act_int4.
    """
    dtype = compute_dtype(x, dtype)
    shift = (SHIFT_GELU if unsigned else 0.0) if shift is None else shift
    q = quantize_act_int4(x, smooth, group, unsigned, dtype, shift)
    out = q.dequantize()
    if unsmooth:
        if smooth is not None:
            out = out * to_dtype(smooth, dtype).to(torch.float32)
        if shift:
            out = out - shift
    return out.to(out_dtype or x.dtype)


def shift_compensation(w: torch.Tensor, smooth: torch.Tensor | None = None, shift: float = SHIFT_GELU
                       ) -> torch.Tensor:
    """[N] float64: what an unsigned layer's main GEMM adds for the shift, shift * sum_k w[n, k] / smooth[k] (w the
    main-branch weight as stored, in the smoothed basis; smooth the stored factor, None for ones). The kernel
    quantizes (x + shift) / smooth, so the layer's stored bias holds -this (research/nunchaku_2026.md B.1)."""
    w = w.detach().to(torch.float64)
    if smooth is not None:
        w = w / smooth.detach().to(torch.float64).view(1, -1)
    return shift * w.sum(1)


# ------------------------------------------------------------------------------------------------------ NVFP4

class Nvfp4Act(NamedTuple):
    """One NVFP4 activation: codes uint8 [..., K] (e2m1 bit patterns, sign << 3 | magnitude index) and the e4m3
    micro-scales [..., K / 16] as torch.float8_e4m3fn."""
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def group(self) -> int:
        return self.codes.shape[-1] // self.scales.shape[-1]

    def dequantize(self) -> torch.Tensor:
        """e2m1 value * e4m3 scale in float32 (exact: 2 and 4 significant bits)."""
        g = _grouped(fp_decode(self.codes, "fp4_e2m1"), self.group)
        return (g * self.scales.to(torch.float32).unsqueeze(-1)).reshape(self.codes.shape)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """cvt.rn.satfinite.e2m1x2.f32: round to the nearest e2m1 value {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to even),
    saturate beyond +-6 (inf included), keep the sign (-0 has the sign bit). NaN -- only 0 * inf in an all-zero
    group, whose e4m3 scale is then 0 so the code cannot matter -- is written as code 0 here: what the hardware
    writes for a NaN input is not pinned down."""
    v = v.to(torch.float32)
    return fp_encode(torch.where(torch.isnan(v), torch.zeros_like(v), v), "fp4_e2m1")


def quantize_act_nvfp4(x: torch.Tensor, smooth: torch.Tensor | None = None, group: int = NVFP4_GROUP,
                       dtype: torch.dtype | None = None) -> Nvfp4Act:
    """quantize_w4a4_fp4_from_fpsum_warp on x [..., K] (after the same h2div by smooth; NVFP4 never shifts):
    per row and 16-k group, scale = fminf(fp32(amax * fp32(1/6)), 448); the stored micro-scale is its e4m3 RNE
    (satfinite); codes = e2m1 RNE of fp32(x * rcp.approx.ftz(scale)), computed from the fp32 scale, so a group whose
    scale rounds in e4m3 dequantizes with a slightly different scale than its codes were made for. There is no
    per-tensor activation scale: a group with fp32 scale <= 2^-10 (amax <= 6 * 2^-10) gets e4m3 scale 0 (2^-10 is
    the tie between 0 and the smallest subnormal 2^-9) and dequantizes to zeros, and amax above 6 * 448 saturates."""
    dtype = compute_dtype(x, dtype)
    v = _prepare(x, smooth, dtype, 0.0)
    g = _grouped(v.to(torch.float32), group)
    amax = g.abs().amax(-1)
    scale = torch.clamp(amax * _recip_const(6.0), max=NVFP4_SCALE_MAX)   # fminf(scale, MSCALE_MAX)
    micro = round_to_fp(scale, "fp8_e4m3").to(torch.float8_e4m3fn)       # exact: the values are e4m3 already
    codes = e2m1_codes(g * rcp_approx_ftz(scale).unsqueeze(-1))
    return Nvfp4Act(codes.reshape(v.shape), micro)


def _nvfp4_values(x: torch.Tensor, smooth: torch.Tensor | None, group: int, dtype: torch.dtype) -> torch.Tensor:
    """quantize_act_nvfp4(...).dequantize() without the bit patterns (the e2m1 values themselves, rounded by the
    same rule; NaN -> +0 as e2m1_codes writes it): the same float32 result, for calibration's many calls."""
    v = _prepare(x, smooth, dtype, 0.0)
    g = _grouped(v.to(torch.float32), group)
    scale = torch.clamp(g.abs().amax(-1) * _recip_const(6.0), max=NVFP4_SCALE_MAX)
    micro = round_to_fp(scale, "fp8_e4m3")
    vals = g * rcp_approx_ftz(scale).unsqueeze(-1)
    vals = round_to_fp(torch.where(torch.isnan(vals), torch.zeros_like(vals), vals), "fp4_e2m1")
    return (vals * micro.unsqueeze(-1)).reshape(v.shape)


def fake_quantize_act_nvfp4(x: torch.Tensor, smooth: torch.Tensor | None = None, group: int = NVFP4_GROUP,
                            dtype: torch.dtype | None = None, unsmooth: bool = False,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the NVFP4 GEMM sees of x: e2m1 value * e4m3 micro-scale, in out_dtype (default x's dtype); in the
    smoothed domain unless unsmooth=True multiplies smooth back (fp32), as for fake_quantize_act_int4."""
    dtype = compute_dtype(x, dtype)
    out = _nvfp4_values(x, smooth, group, dtype)
    if unsmooth and smooth is not None:
        out = out * to_dtype(smooth, dtype).to(torch.float32)
    return out.to(out_dtype or x.dtype)
