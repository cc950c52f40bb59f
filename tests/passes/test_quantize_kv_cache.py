"""quantize_kv_cache: a graph pass. Attentions with cache bits get dcc::quant_kv on K and V in the block's graph; the
engine-mode output moves by the cache's error, more at 4 bits than at 8, and the float function does not move."""
import torch

from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.passes.quantize_kv_cache import QuantizeKvCacheConfig

from tiny_models import fresh_block, outlier_layer

TEMPLATE = outlier_layer()


def _error(bits):
    block, ctx = fresh_block(TEMPLATE)
    float_out = ctx.forward().clone()
    block.attentions[0].kv_bits = bits
    res, = run_block(block, [Step("quantize_kv_cache", QuantizeKvCacheConfig())], ctx, PassTiming())
    assert res.details["attentions"] == {"self_attn": bits} and res.message.startswith("2 KV cache quantization")
    assert [n.target for n in block.nodes if n.kind == "runtime"] == ["quant_kv"] * 2
    assert torch.equal(ctx.forward(), float_out)
    out = ctx.forward(simulate=True)
    torch.testing.assert_close(ctx.forward(simulate=True, samples=2), out[:2])
    return float((out - float_out).norm() / float_out.norm())


def test_kv_cache_error_shrinks_with_bits():
    e4, e8 = _error(4), _error(8)
    assert 0 < e8 < e4 < 0.5


def test_no_cache_bits_no_rewrite():
    block, ctx = fresh_block(TEMPLATE)
    res, = run_block(block, [Step("quantize_kv_cache", QuantizeKvCacheConfig())], ctx, PassTiming())
    assert res.message == "no attention has a quantized KV cache" and not block.rewrites
