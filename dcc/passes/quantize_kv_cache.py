"""Graph pass: the engine's quantized KV cache as dcc:: ops. Where an attention's spec gives cache bits (QServe's
KV4/KV8: per token and head, asymmetric, after RoPE; research/targets.md 1A), its keys and values reach attention
through dcc::quant_kv nodes inserted where the engine writes its cache (before the GQA repeat)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..ir.rewrite import insert_kv_quant
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class QuantizeKvCacheConfig(PassConfig):
    """No options: the cache precision comes from the target's spec assignment (Attention.kv_bits)."""


@register
class QuantizeKvCache(Pass):
    Config = QuantizeKvCacheConfig
    ensures = ("kv_cache_quantized",)

    def run(self, block, config, ctx) -> PassResult:
        kv = {a.path: a.kv_bits for a in block.attentions if a.kv_bits}
        if not kv:
            return PassResult(False, "no attention has a quantized KV cache")
        nodes = ctx.rewrite(partial(insert_kv_quant, attentions=kv))
        bits = ", ".join(f"{p}: {b} bits" for p, b in kv.items())
        return PassResult(False, f"{nodes} KV cache quantization node(s) ({bits})", {"attentions": kv},
                          facts=self.ensures)
