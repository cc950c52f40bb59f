"""Attention found in a captured block in both forms (dcc/ir/attention_sites.py): Llama's sdpa node, and Gemma 2's
eager soft-capped attention (matmul -> scale, tanh soft-cap, mask -> softmax -> matmul), which the analysis and the
KV-cache rewrite then use like an sdpa node."""
import torch
import transformers as T

from dcc.ir.analysis import analyse
from dcc.ir.attention_sites import attention_sites
from dcc.ir.capture import capture
from dcc.ir.graph import Block
from dcc.ir.rewrite import insert_kv_quant, kv_nodes
from dcc.ir import program
from dcc.models.causal_lm import CausalLM
from tiny_models import calib_ids, decoder_layers, first_block_inputs, one_thread  # noqa: F401

SHAPE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=64, head_dim=16)


def _captured(config):
    """(layer, gm, params, args, kwargs) of layer 0, the model built as dcc builds it (eager where sdpa cannot)."""
    torch.manual_seed(0)
    model = CausalLM().build(config, device="cpu")
    layer = decoder_layers(model)[0]
    args, kwargs = first_block_inputs(model, layer, calib_ids())
    gm, params = capture(layer, args, kwargs)
    return layer, gm, params, args, kwargs


def test_sdpa_and_eager_sites():
    _, gm, *_ = _captured(T.LlamaConfig(**SHAPE))
    (site,) = attention_sites(gm)
    assert not site.eager and site.scores is None
    _, gm, *_ = _captured(T.Gemma2Config(**SHAPE))
    (site,) = attention_sites(gm)
    assert site.eager and "self_attn" in site.module_paths()
    assert tuple(site.q.meta["val"].shape) == (2, 4, 16, 16)          # [batch, heads, tokens, head_dim]
    assert tuple(site.k.meta["val"].shape) == (2, 4, 16, 16)          # after the GQA repeat, before K^T
    assert site.scores is not None and site.scores.args[0] is site.q


def test_gemma2_eager_attention_is_analysed_and_takes_kv_quant():
    layer, gm, params, args, kwargs = _captured(T.Gemma2Config(**SHAPE))
    block = Block(0, "model.layers.0", layer)
    block.gm = gm
    analyse(block, gm, params)
    (a,) = block.attentions
    assert (a.q, a.k, a.v, a.o, a.path) == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "self_attn")
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope) == (4, 2, 16, True)
    k, v = kv_nodes(gm, "self_attn")
    assert tuple(k.meta["val"].shape) == (2, 2, 16, 16) == tuple(v.meta["val"].shape)   # as the cache holds them
    ref = program.run(gm, layer, args, kwargs)
    assert insert_kv_quant(gm, {"self_attn": 8}) == 2
    out = program.run(gm, layer, args, kwargs)
    err = float((out[0] - ref[0]).norm() / ref[0].norm()) if isinstance(out, tuple) else \
        float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.05   # an 8-bit cache changes the output, a little
