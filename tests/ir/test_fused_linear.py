"""Fused linears split from the dataflow (dcc/ir/fused_linear.py): Phi-3's qkv_proj and gate_up_proj are found from
the slices that read them, split into parts that compute the same block, and the analysis then sees q, k, v and
gate, up; a linear whose slices are not projections (an adaLN modulation's shift and scale) stays fused."""
import torch
import transformers as T
from torch import nn

from dcc.ir import program
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture
from dcc.ir.fused_linear import SplitLinear, read_parts_directly, sliced_linears, split_linears
from dcc.ir.graph import Block
from dcc.ir.rewrite import linear_nodes
from dcc.models.causal_lm import CausalLM
from tiny_models import calib_ids, decoder_layers, first_block_inputs, one_thread  # noqa: F401

PHI3 = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, pad_token_id=0)


def _phi3_layer():
    torch.manual_seed(0)
    model = CausalLM().build(T.Phi3Config(**PHI3), device="cpu")
    layer = decoder_layers(model)[0]
    return layer, *first_block_inputs(model, layer, calib_ids())


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def test_phi3_fused_projections_are_split_and_analysed():
    layer, args, kwargs = _phi3_layer()
    gm, params = capture(layer, args, kwargs)
    before = program.run(gm, layer, args, kwargs)
    widths = sliced_linears(gm)
    assert widths == {"self_attn.qkv_proj": [64, 32, 32], "mlp.gate_up_proj": [128, 128]}
    split_linears(layer, widths)
    assert isinstance(layer.self_attn.qkv_proj, SplitLinear) and layer.mlp.gate_up_proj.out_features == 256
    gm, params = capture(layer, args, kwargs)
    assert read_parts_directly(gm) == 5        # q, k, v slices and the two chunk pieces
    parts = [n for p, n in linear_nodes(gm).items() if p.startswith(("self_attn.qkv_proj.", "mlp.gate_up_proj."))]
    assert len(parts) == 5 and not any(u.target == torch.ops.aten.cat.default for n in parts for u in n.users)
    assert torch.equal(_out(program.run(gm, layer, args, kwargs)), _out(before))   # the same block, bit for bit
    block = Block(0, "model.layers.0", layer)
    block.gm = gm
    analyse(block, gm, params)
    (a,) = block.attentions
    assert (a.q, a.k, a.v, a.path) == ("self_attn.qkv_proj.0", "self_attn.qkv_proj.1", "self_attn.qkv_proj.2",
                                       "self_attn")
    (mlp,) = block.mlps
    assert (mlp.gate, mlp.ups, mlp.down) == ("mlp.gate_up_proj.0", ["mlp.gate_up_proj.1"], "mlp.down_proj")


class _Modulated(nn.Module):
    """adaLN-style: one linear's output chunked into shift and scale, read by an add and a multiply."""

    def __init__(self):
        super().__init__()
        self.mod = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 8)

    def forward(self, x, c):
        shift, scale = self.mod(c).chunk(2, dim=-1)
        return self.proj(x * (1 + scale) + shift)


def test_a_modulation_stays_fused():
    m = _Modulated().eval()
    gm, _ = capture(m, (torch.randn(2, 8), torch.randn(2, 8)), {})
    assert "mod" in linear_nodes(gm) and sliced_linears(gm) == {}
