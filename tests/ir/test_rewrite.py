"""Graph rewrites that insert dcc:: ops: the int8 activation and KV cache quantization nodes sit where the engine
quantizes (a linear's input; K after RoPE and V, before the GQA repeat), compute the engine's values there, and
leave the float function (the graph with them bypassed) equal to the eager module."""
import pytest
import torch

from dcc.ir import ops, program
from dcc.ir.actquant import fake_quantize_kv, fake_quantize_tokens_int8
from dcc.ir.capture import typed_nodes
from dcc.ir.program import copy_graph
from dcc.ir.rewrite import insert_act_quant, insert_kv_quant, kv_nodes, linear_nodes

from tiny_models import calib_ids, capture_first_layer, decoder_config


@pytest.fixture(scope="module")
def layer():
    return capture_first_layer(decoder_config("llama", layers=1), calib_ids(shape=(3, 12)))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _runtime_nodes(gm):
    return [n for n in gm.graph.nodes if ops.is_runtime_numerics(n)]


def test_act_quant_feeds_the_linear_the_int8_grid(layer):
    module, gm0, params, args, kwargs = layer
    gm = copy_graph(gm0)
    assert insert_act_quant(gm, {"self_attn.q_proj": "int8", "self_attn.k_proj": "int8", "mlp.down_proj": "int8"}) == 2
    q = _runtime_nodes(gm)
    assert len(q) == 2 and all(n.target is ops.quant_act_int8 for n in q)   # q and k share one node
    lins = linear_nodes(gm)
    assert lins["self_attn.q_proj"].args[0] is lins["self_attn.k_proj"].args[0]
    assert lins["self_attn.v_proj"].args[0] is not lins["self_attn.q_proj"].args[0]   # v was not asked for
    down_in = lins["mlp.down_proj"].args[0]
    seen = {}
    program.run_recording(gm, module, args, kwargs, {down_in.name: lambda v: seen.setdefault("q", v),
                                                     down_in.args[0].name: lambda v: seen.setdefault("x", v)},
                          engine=True)
    assert torch.equal(seen["q"], fake_quantize_tokens_int8(seen["x"]))
    assert not torch.equal(seen["q"], seen["x"])
    # the graph, with the run-time numerics bypassed, is the eager module bit for bit; with them, it is not
    with torch.no_grad():
        eager = module(*args, **kwargs)
        eager = eager[0] if isinstance(eager, tuple) else eager
        assert torch.equal(_first(program.run(gm, module, args, kwargs, engine=False)), eager)
        assert not torch.equal(_first(program.run(gm, module, args, kwargs)), eager)
    assert {n.kind for n in typed_nodes(gm)} >= {"runtime"}   # the dumps list them
    with pytest.raises(ValueError, match="activation format 'int4'"):
        insert_act_quant(copy_graph(gm0), {"mlp.down_proj": "int4"})
    with pytest.raises(ValueError, match="no linear node reads mlp.nope.weight"):
        insert_act_quant(copy_graph(gm0), {"mlp.nope": "int8"})


def test_kv_quant_sits_on_the_cache_before_the_gqa_repeat(layer):
    module, gm0, params, args, kwargs = layer
    k, v = kv_nodes(gm0, "self_attn")
    assert tuple(k.meta["val"].shape) == (3, 2, 12, 16) == tuple(v.meta["val"].shape)   # 2 KV heads, not 4
    gm = copy_graph(gm0)
    assert insert_kv_quant(gm, {"self_attn": 4}) == 2
    q = _runtime_nodes(gm)
    assert sorted(n.args[0].name for n in q) == sorted([k.name, v.name]) and all(n.args[1] == 4 for n in q)
    seen = {}
    program.run_recording(gm, module, args, kwargs, {n.name: (lambda v, n=n: seen.setdefault(n.name, v))
                                                     for n in q + [n.args[0] for n in q]}, engine=True)
    for n in q:
        assert torch.equal(seen[n.name], fake_quantize_kv(seen[n.args[0].name], 4))
        # every reader of the cached tensor now reads the quantized one
        assert not [u for u in n.args[0].users if u is not n]
    with pytest.raises(ValueError, match="mlp: 0 attention nodes"):
        insert_kv_quant(copy_graph(gm0), {"mlp": 4})


@pytest.fixture(scope="module")
def gelu_layer():
    """An OPT layer with a GELU MLP (fc1 -> gelu -> fc2)."""
    cfg = decoder_config("opt", vocab=128, layers=1, activation_function="gelu")
    return capture_first_layer(cfg, calib_ids(1, vocab=128, shape=(2, 16)))


def _node(gm, **where):
    found = [n for n in gm.graph.nodes if all(getattr(n, k) == v for k, v in where.items())]
    assert len(found) == 1, found
    return found[0]


def test_uint4_shifts_before_the_smoothing_division(gelu_layer):
    import copy
    from dcc.ir.rewrite import gelu_fed, insert_lowrank, reads_shifted
    from dcc.ir.w4a4 import SHIFT_GELU
    module, gm0, params, args, kwargs = gelu_layer
    module = copy.deepcopy(module)
    assert gelu_fed(gm0) == {"fc2"}
    gm = copy_graph(gm0)
    fc2 = module.fc2
    torch.manual_seed(0)
    fc2.register_buffer("smooth", torch.rand(fc2.in_features) + 0.5)
    fc2.register_buffer("lora_down", torch.zeros(16, fc2.in_features))
    fc2.register_buffer("lora_up", torch.zeros(fc2.out_features, 16))
    insert_lowrank(gm, "fc2")
    assert gelu_fed(gm) == {"fc2"} and not reads_shifted(gm, "fc2")   # found through the division
    assert insert_act_quant(gm, {"fc2": "uint4:bfloat16", "fc1": "int4:bfloat16"}) == 2
    assert gelu_fed(gm) == {"fc2"} and reads_shifted(gm, "fc2") and not reads_shifted(gm, "fc1")
    gelu = _node(gm, op="call_function", target=torch.ops.aten.gelu.default)
    q = linear_nodes(gm)["fc2"].args[0]
    assert q.target is ops.quant_act_int4 and q.args[1:] == (64, True, "bfloat16")
    div = q.args[0]
    shift = div.args[0]
    assert div.target is torch.ops.aten.div.Tensor and shift.target is torch.ops.aten.add.Tensor
    assert shift.args == (gelu, SHIFT_GELU)
    # the branch still reads the unshifted GELU output, and the old (unshifted) division is gone
    users = {u.target for u in gelu.users}
    assert users == {torch.ops.aten.add.Tensor, torch.ops.aten.linear.default}
    assert sum(n.target is torch.ops.aten.div.Tensor for n in gm.graph.nodes) == 1
    # the engine's values: u4 codes of (gelu + shift) / smooth
    seen = {}
    with torch.no_grad():
        program.run_recording(gm, module, args, kwargs, {gelu.name: lambda v: seen.setdefault("h", v),
                                                           q.name: lambda v: seen.setdefault("q", v)}, engine=True)
    expect = ops.quant_act_int4((seen["h"] + SHIFT_GELU) / fc2.smooth, 64, True, "bfloat16")
    assert torch.equal(seen["q"], expect) and float(seen["q"].min()) >= 0
    # without a branch (no smoothing) the shift goes right before the quantizer
    gm = copy_graph(gm0)
    insert_act_quant(gm, {"fc2": "uint4:bfloat16"})
    q = linear_nodes(gm)["fc2"].args[0]
    assert q.args[0].target is torch.ops.aten.add.Tensor and q.args[0].args[1] == SHIFT_GELU
