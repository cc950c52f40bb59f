"""Graph pass: the engine's run-time activation quantization as dcc:: ops. Every linear whose spec marks its input as
quantized when the engine runs (QServe's W4A8 / W8A8: int8 per token, research/targets.md 1A) reads it through a
dcc::quant_act_int8 node, so that every later score and the block's output are what the engine computes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..ir.rewrite import insert_act_quant
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class QuantizeActivationsConfig(PassConfig):
    """No options: the format of each linear's input comes from the target's spec assignment (Linear.act)."""


@register
class QuantizeActivations(Pass):
    Config = QuantizeActivationsConfig
    ensures = ("activations_quantized",)

    def run(self, block, config, ctx) -> PassResult:
        acts = {n: l.act for n, l in block.linears.items() if l.act}
        if not acts:
            return PassResult(False, "no linear's input is quantized at run time")
        nodes = ctx.rewrite(partial(insert_act_quant, linears=acts))
        # the float function is unchanged (the float view bypasses dcc:: ops): weights and collected inputs stand
        return PassResult(False, f"{nodes} int8 per-token quantization node(s) before {len(acts)} linear(s)",
                          {"linears": sorted(acts)}, facts=self.ensures)
