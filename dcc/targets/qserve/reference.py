"""CPU reference of QServe's linear layers (research/targets.md 1A): int8 per-token activations, an exact integer
GEMM against the stored codes, and the epilogue in the engine's float32 order (numerics.py) --
per channel: out = fp16(fma(ascale[m], s1[n] * psum, -(s1_szeros[n] * a_ssum[m]))); groups and W8A8:
out = fp16(psum * (s1[n] * ascale[m])), each product rounded to float32 as QServe's fast-math kernels round it."""
from __future__ import annotations

import torch
from torch import nn

from . import layout, numerics

# float32 sums integers exactly below 2^24: |int8 code x weight| <= 127 * 128, so 1024 products per partial sum
# stay exact in any order; partial sums are then added in float64 (exact as well)
_K_CHUNK = 1024


def exact_int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """[T, K] x [N, K]^T of integer-valued float32 tensors, returned exactly as float64 [T, N]."""
    out = None
    for k0 in range(0, xq.shape[1], _K_CHUNK):
        part = (xq[:, k0:k0 + _K_CHUNK] @ wq[:, k0:k0 + _K_CHUNK].T).double()
        out = part if out is None else out + part
    return out


class QServeLinear(nn.Linear):
    """One quantized linear as QServe's W4A8 / W8A8 GEMM computes it (an nn.Linear subclass, so hooks that look for
    nn.Linear still see it). `weight` holds the decoded float32 weight (s1 * w8, or q*s1 - szeros) so that code
    reading module.weight sees the artifact's values."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], n: int, k: int, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = k, n, fmt
        if fmt == "qserve-w8a8":
            ints, s1, szeros = tensors["weight"].to(torch.float32), tensors["dequant_scale"], None
        else:
            qw = tensors["qweight"]
            s1, szeros = tensors["s1_scales"], tensors.get("s1_szeros")
            if fmt == "qserve-w4a8-group":
                ints = layout.int8_codes_g128(qw, tensors["s2_scales"], tensors["s2_zeros"], n, k).to(torch.float32)
            else:
                ints = layout.unpack_qweight(qw, n, k).to(torch.float32)
        self.register_buffer("ints", ints)                                   # codes or w8, integer-valued
        self.register_buffer("s1", s1.to(torch.float64).view(1, -1))
        self.register_buffer("szeros", None if szeros is None else szeros.to(torch.float64).view(1, -1))
        w = ints.double() * self.s1.view(-1, 1)
        if self.szeros is not None:
            w = w - self.szeros.view(-1, 1)
        self.weight = nn.Parameter(w.to(torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float32), requires_grad=False)

    def epilogue(self, psum: torch.Tensor, a) -> torch.Tensor:
        """fp16 [T, N] from the exact integer GEMM psum [T, N] and the tokens' int8 quantization `a` (scale, sum):
        QServe's epilogue, the zero point (per channel) subtracted as s1_szeros times the token's fp16 sum."""
        if self.szeros is not None:
            return numerics.epilogue_per_channel(psum, self.s1, self.szeros, a.scale, a.sum)
        return numerics.epilogue_scaled(psum, self.s1, a.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = numerics.quantize_tokens(x.reshape(-1, shape[-1]))
        out = self.epilogue(exact_int_matmul(a.codes, self.ints), a).to(x.dtype)   # the engine writes fp16
        if self.bias is not None:
            out = (out + self.bias.to(torch.float16).to(x.dtype)).to(torch.float16).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def decode(tensors, prefix: str, entry: dict) -> torch.Tensor:
    """The float32 weight a QServe layer stands for, decoded from its stored tensors."""
    n, k = entry["shape"]
    fmt = entry["format"]
    if fmt == "qserve-w8a8":
        return layout.decode_w8a8(tensors.get(f"{prefix}.weight"), tensors.get(f"{prefix}.dequant_scale"))
    t = {name: tensors.get(f"{prefix}.{name}") for name in ("qweight", "s1_scales")}
    if fmt == "qserve-w4a8-group":
        return layout.decode_w4a8(t["qweight"], t["s1_scales"], n, k, s2_scales=tensors.get(f"{prefix}.s2_scales"),
                                  s2_zeros=tensors.get(f"{prefix}.s2_zeros"))
    return layout.decode_w4a8(t["qweight"], t["s1_scales"], n, k, s1_szeros=tensors.get(f"{prefix}.s1_szeros"))


TENSORS = {"qserve-w8a8": ("weight", "dequant_scale"),
           "qserve-w4a8-per-channel": ("qweight", "s1_scales", "s1_szeros"),
           "qserve-w4a8-group": ("qweight", "s1_scales", "s2_scales", "s2_zeros")}
