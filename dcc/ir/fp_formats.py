"""Small-float element formats (fp8 e4m3fn / e5m2, fp4 e2m1): their parameters, round-to-nearest-even with
saturation, and the bit patterns (encode / decode) the layouts store."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

FP_DTYPES = {"fp8_e4m3", "fp8_e5m2", "fp4_e2m1"}


class _Fmt(NamedTuple):
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite magnitude; everything above saturates to it

    @property
    def emin(self) -> int:  # exponent of the smallest normal; subnormals share its spacing
        return 1 - self.bias

    @property
    def nbits(self) -> int:
        return 1 + self.ebits + self.mbits


# e4m3fn: no inf, only S.1111.111 is NaN, so the top exponent holds normals up to 1.75 * 2^8 = 448.
# e5m2: IEEE-like (exponent 31 = inf/NaN), max normal 1.75 * 2^15 = 57344. e2m1: no inf/NaN, max 1.5 * 2^2 = 6.
_FMTS = {"fp8_e4m3": _Fmt(4, 3, 7, 448.0), "fp8_e5m2": _Fmt(5, 2, 15, 57344.0), "fp4_e2m1": _Fmt(2, 1, 1, 6.0)}


def _fmt(dtype: str) -> _Fmt:
    if dtype not in _FMTS:
        raise ValueError(f"unknown float element format {dtype!r}; expected one of {sorted(FP_DTYPES)}")
    return _FMTS[dtype]


def round_to_fp(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round to the nearest value of the element format, returned as float32.

    Round-to-nearest-even on ties; values (and +-inf) beyond the format's max saturate to +-max; subnormals use the
    spacing of the smallest normal binade; the sign is kept, so negatives that round to zero give -0.0; NaN stays NaN.
    """
    f = _fmt(dtype)
    # float16/bf16 -> float32 is exact, and every step below is exact in float32 as in float64 (power-of-two scaling,
    # rounding to an integer): a single rounding happens, in the cheaper float32 unless x is float64
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xd = x.detach().to(work)
    a = xd.abs()
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1), so floor(log2 a) = e - 1 (0 and inf give e = 0)
    e = (e - 1).clamp(min=f.emin)  # below the smallest normal the spacing stays 2^(emin - mbits)
    quantum = torch.ldexp(torch.ones_like(a), (e - f.mbits).to(work))
    r = torch.round(a / quantum) * quantum  # power-of-two scaling is exact; torch.round is half-to-even
    r = torch.copysign(r.clamp(max=f.max), xd)  # saturate, then restore the sign (incl. -0)
    return torch.where(torch.isnan(xd), xd, r).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _decode_list(dtype: str) -> tuple[float, ...]:
    f = _fmt(dtype)
    out = []
    for code in range(1 << f.nbits):
        sign = -1.0 if code >> (f.ebits + f.mbits) else 1.0
        field, mant = (code >> f.mbits) & ((1 << f.ebits) - 1), code & ((1 << f.mbits) - 1)
        if dtype == "fp8_e4m3" and field == 15 and mant == 7:
            v = math.nan
        elif dtype == "fp8_e5m2" and field == 31:
            v = sign * math.inf if mant == 0 else math.nan
        elif field == 0:  # subnormal: no implicit leading 1
            v = sign * mant * 2.0 ** (f.emin - f.mbits)
        else:
            v = sign * (1 + mant / (1 << f.mbits)) * 2.0 ** (field - f.bias)
        out.append(v)
    return tuple(out)


def fp_decode(codes: torch.Tensor, dtype: str) -> torch.Tensor:
    """Bit patterns (any integer tensor) -> float32 values of the element format."""
    table = torch.tensor(_decode_list(dtype), dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= table.numel()):
        raise ValueError(f"{dtype} codes must lie in [0, {table.numel() - 1}]")
    return table[c]


def fp_encode(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float values -> uint8 bit patterns, after rounding with round_to_fp (RNE, saturating, -0 -> sign bit set)."""
    f = _fmt(dtype)
    r = round_to_fp(values, dtype).to(torch.float64)
    nan = torch.isnan(r)
    if dtype == "fp4_e2m1" and bool(nan.any()):
        raise ValueError("fp4_e2m1 has no NaN encoding")
    # Non-negative finite codes 0..max are increasing in value, so an exact search finds each rounded magnitude.
    pos = torch.tensor(_decode_list(dtype), dtype=torch.float64, device=r.device)[: 1 << (f.ebits + f.mbits)]
    pos = pos[: int(torch.nonzero(pos == f.max)[0]) + 1]
    idx = torch.searchsorted(pos, torch.where(nan, 0.0, r.abs()))
    code = idx | (torch.signbit(r).to(torch.int64) << (f.ebits + f.mbits))
    code = torch.where(nan, 0x7F, code)  # canonical NaN (e4m3fn S.1111.111, e5m2 S.11111.11), sign dropped
    return code.to(torch.uint8)
