"""Round-to-nearest weight quantization: each linear with a spec is quantized with its current clip ratios (set by
the clip pass, or 1.0), and its weight replaced by exactly the values the artifact will decode to."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.formats import quant_error, quantize_tensor
from .base import Pass, PassConfig, PassResult, quantizable, register


@dataclass(frozen=True)
class RtnConfig(PassConfig):
    """No options: the spec comes from the target (per layer), the clip ratios from an earlier clip pass."""


def quantize_linear(block, lin, codes_from=None, x: torch.Tensor | None = None) -> dict:
    """Quantize one linear in place (fake-quant weight) and attach its QuantizedTensor; returns error stats, with
    the relative output error on inputs x [T, K] when given."""
    mod = block.linear_module(lin.name)
    w = mod.weight.data
    qt = codes_from if codes_from is not None else quantize_tensor(w.float(), lin.spec, 1.0 if lin.clip is None else lin.clip)
    wq = qt.dequantize(torch.float32)
    err = quant_error(w.float(), wq)
    mod.weight.data = wq.to(w.dtype)
    lin.qtensor = qt
    lin.stats["weight_sqnr_db"] = round(err["sqnr_db"], 3)
    if x is not None:
        x = x[:1024]
        ref = x @ w.float().T
        lin.stats["output_rel_err"] = round(float((x @ wq.T - ref).norm() / ref.norm().clamp(min=1e-30)), 6)
    return err


@register
class Rtn(Pass):
    Config = RtnConfig
    ensures = ("quantized",)
    forbids = ("quantized",)   # one quantization per linear

    def run(self, block, config, ctx) -> PassResult:
        lins = [l for l in quantizable(block) if l.qtensor is None]
        details = {l.name: round(quantize_linear(block, l, x=ctx.inputs(l.name))["sqnr_db"], 2) for l in lins}
        return PassResult(bool(lins), f"quantized {len(lins)} linears (weight SQNR dB: min "
                          f"{min(details.values(), default=0):.1f})", {"sqnr_db": details})
