"""Run-time quantization that engines apply to activations, simulated exactly: QServe's int8 per-token activations
(with the per-token sum its per-channel GEMM needs) and its 4/8-bit KV cache (per token, per head, asymmetric,
fractional zero), as research/targets.md section 1A describes its kernels."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Int8Tokens(NamedTuple):
    """x quantized per token: codes int8-valued (held in float32), scale fp16 [T, 1], sum fp16 [T, 1]."""
    codes: torch.Tensor
    scale: torch.Tensor
    sum: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.codes * self.scale.to(torch.float32)


def quantize_tokens_int8(x: torch.Tensor) -> Int8Tokens:
    """QServe's quant kernel on a [..., K] activation: the input is fp16 on the engine, so round to fp16 first; amax and
    the sum are taken in float32; scale = fp16(amax / 127); codes = round-half-even(x * (127 / amax)) saturated to
    int8 (the kernel multiplies by 127/amax in float32 rather than dividing by the rounded scale). An all-zero token
    gets amax 0 on the engine (codes NaN -> 0); here its codes are 0 and its scale 0 as well."""
    x16 = x.to(torch.float16).to(torch.float32)
    amax = x16.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(x16 * inv).clamp(-128, 127)
    return Int8Tokens(codes, (amax / 127.0).to(torch.float16), x16.sum(-1, keepdim=True).to(torch.float16))


def fake_quantize_tokens_int8(x: torch.Tensor) -> torch.Tensor:
    """What a W*A8 linear sees of its input: codes * scale, in x's dtype."""
    return quantize_tokens_int8(x).dequantize().to(x.dtype)


def fake_quantize_kv(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """QServe's KV cache quantization of K (after RoPE) or V, shaped [B, kv_heads, T, head_dim]: per token and head,
    scale = fp16((max - min) / qmax), zero = fp16(-qmax * min / (max - min)) (fractional, not rounded),
    q = cvt.rni.sat.u8(x * (1 / scale) + zero), kept to `bits` bits (the kernel masks with & 0xF for 4 bits), and
    the decode kernel reads (q - zero) * scale back in fp16. A constant vector (max == min) has no range: the engine
    divides by zero there; it is returned unchanged (rounded to fp16)."""
    q, scale, zero, flat, x16 = kv_codes(x, bits)
    out = ((q - zero) * scale).to(torch.float16).to(torch.float32)
    return torch.where(flat, x16, out).to(x.dtype)


def kv_codes(x: torch.Tensor, bits: int):
    """The KV cache's quantization of x [..., D] per vector, as fake_quantize_kv describes it: (codes in float32,
    scale and zero [..., 1] (fp16 values in float32), the mask of flat vectors [..., 1] -- whose codes, scale and
    zero mean nothing --, and x rounded to fp16, in float32)."""
    if bits not in (4, 8):
        raise ValueError(f"KV cache bits must be 4 or 8, got {bits}")
    qmax = float(2 ** bits - 1)
    x16 = x.to(torch.float16).to(torch.float32)
    lo, hi = x16.amin(-1, keepdim=True), x16.amax(-1, keepdim=True)
    rng = hi - lo
    flat = rng == 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    scale = (rng / qmax).to(torch.float16).to(torch.float32)
    zero = (-qmax * lo / rng).to(torch.float16).to(torch.float32)
    inv = (1.0 / scale)                                   # float32 reciprocal of the fp16 scale, as the kernel takes it
    q = torch.round(x16 * inv + zero).clamp(0, 255)       # cvt.rni.sat.u8: half-to-even, saturate to [0, 255]
    q = torch.remainder(q, qmax + 1)                      # & 0xF (4 bits) / & 0xFF (8 bits): a 16 would wrap to 0
    return q, scale, zero, flat, x16
