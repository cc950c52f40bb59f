"""ir.program: a captured block graph runs with any block's parameters bound by path (one capture serves every
block of its signature), bit-identical to the eager module; the float view bypasses dcc:: ops; a parameter a pass
adds becomes a graph input."""
import copy

import pytest
import torch

from dcc.ir import program
from dcc.ir.capture import Captures
from dcc.ir.program import copy_graph, float_view
from dcc.ir.rewrite import add_linear_bias, insert_act_quant

from tiny_models import calib_ids, capture_first_layer, decoder_config


@pytest.fixture(scope="module")
def layer():
    return capture_first_layer(decoder_config("qwen2", layers=1), calib_ids(shape=(2, 10)))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_one_capture_runs_every_block_with_its_own_weights(layer):
    module, gm, params, args, kwargs = layer
    other = copy.deepcopy(module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
        for m in (module, other):
            assert torch.equal(_first(program.run(gm, m, args, kwargs)), _first(m(*args, **kwargs)))
    caps = Captures()
    assert caps.get(module, args, kwargs)[0] is caps.get(other, args, kwargs)[0]   # same code and shapes
    short = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
    assert caps.get(module, short, kwargs)[0] is not caps.get(module, args, kwargs)[0]   # another batch size
    with pytest.raises(ValueError, match="inputs of another structure"):
        program.run(gm, module, args, {**kwargs, "extra": torch.zeros(1)})


def test_float_view_bypasses_runtime_numerics_and_follows_rewrites(layer):
    module, gm0, params, args, kwargs = layer
    gm = copy_graph(gm0)
    assert float_view(gm) is float_view(gm)   # cached
    insert_act_quant(gm, {"mlp.down_proj": "int8"})
    view = float_view(gm)
    assert not any(n.op == "call_function" and "quant_act" in str(n.target) for n in view.graph.nodes)
    assert any("quant_act" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(_first(program.run(gm, module, args, kwargs, engine=False)),
                           _first(module(*args, **kwargs)))


def test_added_parameter_is_a_graph_input(layer):
    module, gm0, params, args, kwargs = layer
    gm = copy_graph(gm0)
    m = copy.deepcopy(module)
    m.mlp.down_proj.bias = torch.nn.Parameter(torch.full((m.mlp.down_proj.out_features,), 0.25))
    add_linear_bias(gm, "mlp.down_proj")
    with torch.no_grad():
        assert torch.equal(_first(program.run(gm, m, args, kwargs)), _first(m(*args, **kwargs)))
        assert not torch.equal(_first(program.run(gm0, m, args, kwargs)), _first(m(*args, **kwargs)))
    with pytest.raises(ValueError, match="already reads a bias"):
        add_linear_bias(gm, "mlp.down_proj")
