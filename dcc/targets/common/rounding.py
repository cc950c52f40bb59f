"""Single IEEE roundings on the CPU where torch would round twice: float64 -> fp16/bf16 (torch's cast goes through
float32, so a value that float32 rounds onto a 16-bit tie is rounded again, e.g. 1 + 2^-11 + 2^-40 -> 1), and a
float32 fma (a * b + c rounded once, the GPU's FFMA) for products that float64 holds exactly. Both use round to odd:
rounding a value first to odd in a format with at least two more significant bits makes the next round-to-nearest
correct (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums", IEEE TC 2008)."""
from __future__ import annotations

import torch

_INT = {torch.float64: torch.int64, torch.float32: torch.int32}


def _to_odd(approx: torch.Tensor, exact_side: torch.Tensor) -> torch.Tensor:
    """approx (float32 or float64, a nearest rounding of some value v) replaced by the neighbour on v's side where
    approx is inexact and even; exact_side: the sign of v - approx (0 where approx == v)."""
    bits = approx.view(_INT[approx.dtype])
    even = (bits & 1) == 0
    toward = torch.where(exact_side > 0, torch.full_like(approx, float("inf")), torch.full_like(approx, -float("inf")))
    moved = torch.nextafter(approx, toward)
    fix = (exact_side != 0) & even & torch.isfinite(approx)
    return torch.where(fix, moved, approx)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 x rounded once (round to nearest, ties to even) to float16, bfloat16 or float32, returned in dtype.
    float64 -> float32 is a single rounding already; for 16 bits x is first rounded to odd in float32 (24 >= 11 + 2
    and 8 + 2 significant bits), then to dtype. Overflow and NaN behave as torch's casts do."""
    xd = x.to(torch.float64)
    f = xd.to(torch.float32)
    if dtype == torch.float32:
        return f
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"round_once rounds to float16, bfloat16 or float32, not {dtype}")
    side = torch.sign(xd - f.to(torch.float64))   # exact: both are float64 values within one float32 ulp
    return _to_odd(f, side).to(dtype)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c with one rounding (fma.rn.f32 / FFMA), for float32 a, b, c whose product float64 holds
    exactly (at most 53 significant bits together, e.g. an 11-bit fp16 value times a float32). The float64 sum is
    kept exact by TwoSum, rounded to odd, then to float32 (53 >= 24 + 2)."""
    p = a.to(torch.float64) * b.to(torch.float64)
    cd = c.to(torch.float64)
    s = p + cd
    bb = s - p
    err = (p - (s - bb)) + (cd - bb)                 # s + err == p + c exactly (Knuth's TwoSum)
    err = torch.where(torch.isfinite(s), err, torch.zeros_like(err))
    return _to_odd(s, torch.sign(err)).to(torch.float32)
