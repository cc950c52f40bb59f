"""Graph pass: the engine's run-time activation quantization as dcc:: ops. Every linear whose spec marks its input as
quantized when the engine runs (QServe's W4A8 / W8A8: int8 per token, research/targets.md 1A; Nunchaku's W4A4)
reads it through a dcc:: quantization node, so that every later score and the block's output are what the engine
computes.

A "uint4" input (Nunchaku's `act_unsigned` layer after a GELU, research/nunchaku_2026.md B.1) is quantized as
(x + SHIFT_GELU) / smooth: the graph adds the shift before the smoothing division, and the linear's bias takes it
back, bias - SHIFT_GELU * sum_k W[n, k] / smooth[k], so the float function stands. The fold is made here with the
current weight and made again by the quantizer (rtn.quantize_linear) with the quantized one."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..ir.ops import is_shifted
from ..ir.rewrite import add_linear_bias, insert_act_quant
from ..ir.w4a4 import shift_compensation
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class QuantizeActivationsConfig(PassConfig):
    """No options: the format of each linear's input comes from the target's spec assignment (Linear.act)."""


def fold_shift(block, ctx, name: str, w_before: torch.Tensor | None = None) -> None:
    """Give linear `name` (a "uint4" one) the bias that takes the shift back for its current weight:
    bias + compensation(w_before) - compensation(weight) (w_before None: no compensation yet). A linear without a
    bias gets one (the graph reads it from then on; Nunchaku always stores one)."""
    mod = block.linear_module(name)
    smooth = getattr(mod, "smooth", None)
    delta = -shift_compensation(mod.weight.data, smooth)
    if w_before is not None:
        delta += shift_compensation(w_before, smooth)
    if mod.bias is None:
        mod.bias = torch.nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype,
                                                  device=mod.weight.device), requires_grad=False)
        ctx.rewrite(partial(add_linear_bias, path=name))
    mod.bias.data = (mod.bias.data.double() + delta.to(mod.bias.device)).to(mod.bias.dtype)


@register
class QuantizeActivations(Pass):
    Config = QuantizeActivationsConfig
    ensures = ("activations_quantized",)
    preserves_function = True   # quantizers are the identity in the float function; a shift is taken back by the bias

    def run(self, block, config, ctx) -> PassResult:
        acts = {n: l.act for n, l in block.linears.items() if l.act}
        if not acts:
            return PassResult(False, "no linear's input is quantized at run time")
        nodes = ctx.rewrite(partial(insert_act_quant, linears=acts))
        shifted = sorted(n for n, a in acts.items() if is_shifted(a))
        for name in shifted:
            fold_shift(block, ctx, name)
        kinds = "/".join(sorted({a.partition(":")[0] for a in acts.values()}))
        msg = f"{nodes} {'int8 per-token' if kinds == 'int8' else kinds} quantization node(s) before {len(acts)} " \
              f"linear(s)"
        if shifted:
            msg += f"; {len(shifted)} unsigned after GELU (shifted by 0.171875, taken back by the bias)"
        # without a shift, the float function is unchanged (the float view bypasses dcc:: ops): weights and collected
        # inputs stand; a shift changes the inputs the linears read and their biases
        return PassResult(bool(shifted), msg, {"linears": sorted(acts), "unsigned": shifted}, facts=self.ensures)
