"""QoQ progressive group quantization (Lin et al., QServe 2024; research/deepcompressor.md): level 0 maps each output
row to int8 with a per-channel fp16 scale s1 inside a protective range [-P, P]; level 1 quantizes those int8-domain
values to unsigned b-bit codes per group with an integer scale s2 and an integer zero z, so the engine rebuilds
w8 = q * s2 - z (int8) in registers and runs an int8 GEMM; the weight is s1 * w8."""
from __future__ import annotations

import functools

import torch

INT8_MAX = 127


@functools.lru_cache(maxsize=None)
def protective_range(bits: int = 4, post_scale: bool = True) -> int:
    """The largest P such that every integer range [vmin, vmax] inside [-P, P] (vmax >= 0) survives level 1: its
    endpoints, requantized to `bits` bits with s2 = round((vmax - vmin) / qmax) (at least 1) and an integer zero,
    dequantize back inside [-127, 127]. Brute force over all ranges, as DeepCompressor constructs it: P = 120 for a
    post-scale zero (w8 = q*s2 - z, QServe's form), 119 for a pre-scale one (w8 = (q - z)*s2)."""
    qmax = 2 ** bits - 1
    ok = set()
    for vmax in range(0, INT8_MAX + 1):
        for vmin in range(-INT8_MAX, vmax + 1):
            s = min(max(round((vmax - vmin) / qmax), 1), INT8_MAX)   # Python round: half to even, like torch
            if post_scale:
                z = min(max(round(-vmin), -INT8_MAX), INT8_MAX)
                ends = [min(max(round((v + z) / s), 0), qmax) * s - z for v in (vmin, vmax)]
            else:
                z = min(max(round(-vmin / s), -128), 127)
                ends = [(min(max(round(v / s + z), 0), qmax) - z) * s for v in (vmin, vmax)]
            if all(-INT8_MAX <= e <= INT8_MAX for e in ends):
                ok.add((vmin, vmax))
    for p in range(INT8_MAX, 0, -1):
        if all((vmin, vmax) in ok for vmax in range(0, p + 1) for vmin in range(-p, vmax + 1)):
            return p
    raise AssertionError("no protective range")  # unreachable: P = 1 always works


def level0(w: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """s1 [N, 1] = absmax / P rounded to scale_dtype (0 -> 1), and the int8-domain values x0 = clamp(w / s1, -P, P)
    in float32 (not rounded: level 1 rounds them once)."""
    p = protective_range(bits)
    w = w.detach().to(torch.float32)
    s1 = (w.abs().amax(1, keepdim=True) / p).to(scale_dtype)
    s1 = torch.where(s1 == 0, torch.ones_like(s1), s1)
    if not bool(torch.isfinite(s1).all()):
        raise ValueError("non-finite per-channel scale (NaN/inf weights, or the range overflows the scale dtype)")
    return s1, (w / s1.to(torch.float32)).clamp(-p, p)


def level1_params(x0: torch.Tensor, group_size: int, bits: int, c_lo=1.0, c_hi=1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of x0 [N, K]: integer s2 = round((max - min) / qmax) clamped to [1, 255 // qmax] (the kernel
    multiplies q*s2 inside one byte) and integer z = round(-min) (post-scale zero, stored negated as an int8).
    c_lo / c_hi shrink the range toward its middle (clip ratios, scalars or [N, G])."""
    qmax = 2 ** bits - 1
    n, k = x0.shape
    g = x0.view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    mid = (lo + hi) / 2
    lo, hi = mid - (mid - lo) * c_lo, mid + (hi - mid) * c_hi
    s2 = torch.round((hi - lo) / qmax).clamp(1, 255 // qmax)
    z = torch.round(-lo).clamp(-INT8_MAX, INT8_MAX)
    return s2.to(torch.int16), z.to(torch.int16)


def level1_codes(x0: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """q = clamp(round((x0 + z) / s2), 0, qmax): the sum and the division in float32, half to even."""
    n, k = x0.shape
    g = x0.view(n, k // group_size, group_size)
    q = torch.round((g + z.unsqueeze(-1).float()) / s2.unsqueeze(-1).float()).clamp(0, 2 ** bits - 1)
    return q.to(torch.int16).reshape(n, k)


def int8_weight(codes: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    """w8 = q * s2 - z per element (int16 [N, K]); raises if it leaves what QServe's kernel computes correctly."""
    n, k = codes.shape
    q = codes.to(torch.int32).view(n, k // group_size, group_size)
    prod = q * s2.to(torch.int32).unsqueeze(-1)
    w8 = prod - z.to(torch.int32).unsqueeze(-1)
    if bool((prod > 255).any()) or bool((prod < 0).any()):
        raise ValueError("progressive quantization: q * s2 leaves [0, 255] (one byte in the kernel)")
    if bool((w8 > 127).any()) or bool((w8 < -128).any()):
        raise ValueError("progressive quantization: q * s2 - z leaves int8")
    return w8.to(torch.int16).reshape(n, k)


def dequantize(codes: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s1 * w8: exact in float32 (a 16-bit scale times an integer of at most 8 bits)."""
    return (int8_weight(codes, s2, z, group_size).to(torch.float32) * s1.to(torch.float32)).to(dtype)
