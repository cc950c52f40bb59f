"""Torch versions of the fast decoder's fused ops: the CPU path, the GPU fallback where a kernel does not apply, and
the references the CUDA kernels (csrc/attn) are tested against. KV4 numerics are dcc's quant_kv
(ir/actquant.fake_quantize_kv, QServe's cache): per token and head, scale = fp16((max - min) / 15), zero =
fp16(-15 min / (max - min)), q = rni(x * (1 / scale) + zero) & 0xF, read back as fp16((q - zero) * scale)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ir.actquant import kv_codes


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """h (float32 residual) += delta, in place; returns LlamaRMSNorm(h) in float32 (transformers' order: mean of
    squares, rsqrt, times the weight) cast to out_dtype."""
    if delta is not None:
        h += delta.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    return (weight.to(torch.float32) * (h * torch.rsqrt(var + eps))).to(out_dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on x [..., D] in float32: x cos + rotate_half(x) sin (NeoX halves)."""
    x = x.to(torch.float32)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """SiLU(gate) * up in float32, cast to out_dtype (the reference model's act_fn(gate) * up)."""
    return (F.silu(gate.to(torch.float32)) * up.to(torch.float32)).to(out_dtype)


def kv4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D] in 0..15, scale fp16 [...], zero fp16 [...]) such that kv4_dequantize
    gives fake_quantize_kv(x, 4) bit for bit. A flat vector (max == min), which quant_kv returns unchanged, is stored
    as codes 0, scale 1, zero -min: (0 + min) * 1 is min exactly (an fp16 value)."""
    q, scale, zero, flat, x16 = kv_codes(x, 4)
    q = torch.where(flat, torch.zeros_like(q), q)
    scale = torch.where(flat, torch.ones_like(scale), scale)
    zero = torch.where(flat, -x16.amin(-1, keepdim=True), zero)
    return q.to(torch.uint8), scale.squeeze(-1).to(torch.float16), zero.squeeze(-1).to(torch.float16)


def kv4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., D] (0..15) -> [..., D/2] bytes, the even channel in the low nibble (QServe's cache)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def kv4_unpack(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def kv4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 [..., D] of fp16 values: fp16((q - zero) * scale), each step in float32 as the reference."""
    q = kv4_unpack(packed).to(torch.float32)
    s, z = scale.to(torch.float32).unsqueeze(-1), zero.to(torch.float32).unsqueeze(-1)
    return ((q - z) * s).to(torch.float16).to(torch.float32)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q [B, H, D], k/v [B, KVH, T, D] (float32 or 16-bit), lengths [B] (slots < length
    are attended) -> [B, H, D] in q's dtype. GQA by folding the group into the query axis ([B, KVH, G, D])."""
    b, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d).to(k.dtype)
    mask = (torch.arange(t, device=q.device)[None, :] < lengths.to(q.device)[:, None]).view(b, 1, 1, t)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return o.reshape(b, h, d).to(q.dtype)
