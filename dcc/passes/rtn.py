"""Round-to-nearest weight quantization: each linear with a spec is quantized with its current clip ratios (set by
the clip pass, or 1.0), and its weight replaced by exactly the values the artifact will decode to. A linear whose
input the engine shifts ("uint4", after a GELU) has the shift taken back by its bias, folded again here for the
quantized weight and rounded to the 16-bit dtype the engine stores it in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.formats import quant_error, quantize_tensor
from ..ir.ops import is_shifted
from ..ir.rewrite import reads_shifted
from ..ir.w4a4 import SHIFT_GELU
from .base import Pass, PassConfig, PassResult, quantizable, register
from .quantize_activations import fold_shift

SQNR_TOKENS = 1024   # the batch's first tokens, on which a quantized linear's relative output error is reported


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
    if shifted(block, lin):   # the bias takes the shift back for the quantized weight, as stored (16-bit)
        fold_shift(block, None, lin.name, w)
        mod.bias.data = mod.bias.data.to(lin.spec.torch_scale_dtype).to(mod.bias.dtype)
    lin.qtensor = qt
    x = unshifted(block, lin, x)
    lin.stats["weight_sqnr_db"] = round(err["sqnr_db"], 3)
    if x is not None:
        x = x[:SQNR_TOKENS]
        ref = x @ w.float().T
        lin.stats["output_rel_err"] = round(float((x @ wq.T - ref).norm() / ref.norm().clamp(min=1e-30)), 6)
    return err


def shifted(block, lin) -> bool:
    """Whether the linear reads its input shifted in the block's graph (quantize_activations with "uint4")."""
    return is_shifted(lin.act) and block.gm is not None and reads_shifted(block.gm, lin.name)


def unshifted(block, lin, x: torch.Tensor | None) -> torch.Tensor | None:
    """The inputs [T, K] a linear's weight error acts on. A "uint4" linear reads (x + SHIFT_GELU) / smooth, but its
    bias takes the shift back for whatever weight it has, so its output error is (Wq - W) x / smooth: the shift is
    taken off the collected inputs."""
    if x is None or not shifted(block, lin):
        return x
    smooth = getattr(block.linear_module(lin.name), "smooth", None)
    # computed where the smooth vector is, then brought to x (host memory, when the inputs are spilled)
    return x - (SHIFT_GELU if smooth is None else (SHIFT_GELU / smooth.to(x.dtype)).to(x.device))


@register
class Rtn(Pass):
    Config = RtnConfig
    ensures = ("quantized",)
    forbids = ("quantized",)   # one quantization per linear

    def run(self, block, config, ctx) -> PassResult:
        lins = [l for l in quantizable(block) if l.qtensor is None]
        details = {l.name: round(quantize_linear(block, l, x=ctx.stats.head(ctx.inputs(l.name), SQNR_TOKENS))
                                 ["sqnr_db"], 2) for l in lins}
        return PassResult(bool(lins), f"quantized {len(lins)} linears (weight SQNR dB: min "
                          f"{min(details.values(), default=0):.1f})", {"sqnr_db": details})
