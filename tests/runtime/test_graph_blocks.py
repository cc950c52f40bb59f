"""The artifact's model runs its blocks as captured graphs: bit-identical to eager execution without run-time
numerics, format linears called as the modules they are, and the KV cache quantized exactly where transformers'
attention receives K and V (checked against an attention function that quantizes them there)."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

from dcc.ir.actquant import fake_quantize_kv
from dcc.runtime.graph_blocks import run_blocks_as_graphs

from tiny_models import decoder_config


def _model(seed=0):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM._from_config(decoder_config("llama", layers=2), attn_implementation="sdpa").eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class _Doubled(nn.Linear):
    """A format linear: a subclass of nn.Linear that computes something else (twice the product), with no weight
    where the graph's aten.linear would read one."""

    def __init__(self, lin: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("w", lin.weight.detach().clone())
        self.weight, self.bias = None, None

    def forward(self, x):
        return 2 * (x @ self.w.T)


def test_graph_blocks_equal_eager_and_call_format_linears():
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    model = _model()
    model.model.layers[1].mlp.down_proj = _Doubled(model.model.layers[1].mlp.down_proj)
    eager = _logits(model, ids)
    run_blocks_as_graphs(model, {})
    assert torch.equal(_logits(model, ids), eager)
    torch.testing.assert_close(_logits(model, ids[:1]), eager[:1])   # another shape: captured again
    fwd = model.model.layers[1].forward
    assert len(fwd.graphs) == 2
    calls = [n.target for n in next(iter(fwd.graphs.values())).graph.nodes if n.op == "call_module"]
    assert calls == ["mlp.down_proj"]


def test_kv_cache_quantized_where_attention_receives_k_and_v():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def kv4_attention(module, query, key, value, attention_mask, **kwargs):
        # the oracle: transformers hands attention K (after RoPE) and V before the GQA repeat
        return sdpa_attention_forward(module, query, fake_quantize_kv(key, 4), fake_quantize_kv(value, 4),
                                      attention_mask, **kwargs)

    AttentionInterface.register("zz_test_kv4", kv4_attention)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    oracle = _model()
    # only layer 0's attention: the layers share one config, so layer 0 gets its own copy routed to the oracle
    oracle.model.layers[0].self_attn.config = copy.copy(oracle.config)
    oracle.model.layers[0].self_attn.config._attn_implementation = "zz_test_kv4"
    expected = _logits(oracle, ids)

    model = _model()
    plain = _logits(model, ids)
    run_blocks_as_graphs(model, {"model.layers.0.self_attn": 4})
    got = _logits(model, ids)
    assert torch.equal(got, expected)
    assert float((got - plain).abs().max()) > 1e-4


def test_kv_entry_outside_the_blocks_is_refused():
    with pytest.raises(ValueError, match="KV cache entry lm_head.attn is not inside a block"):
        run_blocks_as_graphs(_model(), {"lm_head.attn": 4})
