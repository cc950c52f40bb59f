"""reorder: on captured one-layer Llama (GQA, gated MLP), Qwen2 (v bias) and OPT (fc1 and v biases, ReLU MLP) blocks
quantized in groups, the permutation leaves the float output unchanged, sorts down_proj's and (per KV head) o_proj's
input channels by absmax, keeps channels in their heads; per-channel or missing specs leave the block untouched."""
import copy
from functools import lru_cache

import pytest
import torch

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import Step
from dcc.api import block0_inputs
from dcc.compiler.sequential import compile_blocks
from dcc.ir.formats import QuantSpec
from dcc.passes.base import get_pass
from dcc.passes.reorder import Reorder, ReorderConfig, channel_order

from tiny_models import (analysed_block, assert_same_logits, calib_ids, capture_first_layer, decoder_config, lazy,
                         logits, one_thread, rebuild, saved_model)  # noqa: F401 (one_thread: autouse fixture)

D = 16   # head_dim of every tiny layer here (hidden 64, 4 query heads, 2 KV heads; OPT: 4 and 4)
G8 = QuantSpec("int4", group_size=8)          # groups smaller than a head: both kinds can regroup channels
PER_CHANNEL = QuantSpec("int4", group_size=0)


@lru_cache(maxsize=None)
def _layer(family: str):
    return capture_first_layer(decoder_config(family, vocab=128, layers=1), calib_ids(1, vocab=128, shape=(2, 16)))


def _block(family: str, spec: QuantSpec | None = G8, specs: dict | None = None):
    """A fresh copy of the family's layer with random biases as an analysed Block with `spec` on every linear (specs:
    per-linear overrides), and its context."""
    layer, gm, params, args, kwargs = _layer(family)
    block = analysed_block(copy.deepcopy(layer), gm, params)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, lin in block.linears.items():
            lin.spec = (specs or {}).get(name, spec)
            b = block.linear_module(name).bias
            if b is not None:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return block, BlockContext(block, args, kwargs, torch.device("cpu"))


def _weights(block) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.module.state_dict().items()}


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b's rows (1-D: entries) are a permutation of a's."""
    if a.dim() == 1:
        return torch.equal(a.sort().values, b.sort().values)
    return a.shape == b.shape and torch.equal(a.unique(dim=0), b.unique(dim=0))   # unique sorts the rows


def test_registered_and_config():
    assert get_pass("reorder") is Reorder and "reordered" in Reorder.ensures
    c = ReorderConfig(kinds=("vo",), verify=False)
    assert ReorderConfig.from_dict(c.to_dict()) == c
    assert ReorderConfig.from_dict({"kinds": ["mlp"]}).kinds == ("mlp",)   # a YAML list becomes the tuple
    for bad in ({"kinds": ("qk",)}, {"kinds": ()}, {"kinds": ("mlp", "mlp")}, {"verify": "yes"}):
        with pytest.raises(ValueError, match="reorder"):
            ReorderConfig(**bad)


def test_channel_order_is_descending_and_stable():
    x = torch.tensor([1.0, 5.0, 0.0, 5.0, 0.0, 3.0])
    assert channel_order(x).tolist() == [1, 3, 5, 0, 2, 4]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_preserves_block_output(family):
    block, ctx = _block(family)
    ref, w0 = ctx.forward().clone(), _weights(block)
    res = Reorder().run(block, ReorderConfig(), ctx)
    assert res.changed and not res.details["skipped"]
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-5, atol=1e-5)
    w1 = _weights(block)
    a, m = block.attentions[0], block.mlps[0]
    producers = [a.v] + m.ups + ([m.gate] if m.gate else [])
    moved = [f"{n}.{p}" for n in producers for p in ("weight", "bias") if f"{n}.{p}" in w0]
    for k in moved:   # rows (and biases) are permuted, not changed
        assert not torch.equal(w0[k], w1[k]) and _same_rows(w0[k], w1[k]), k
    for name in (a.o, m.down):   # columns are permuted
        assert _same_rows(w0[f"{name}.weight"].T, w1[f"{name}.weight"].T)
    untouched = {f"{n}.weight" for n in block.linears} - {f"{n}.weight" for n in producers + [a.o, m.down]}
    assert all(torch.equal(w0[k], w1[k]) for k in untouched)
    if family == "opt":
        assert m.gate is None and block.linear_module(m.ups[0]).bias is not None   # ReLU MLP with fc1 bias
    for d in res.details["groups"].values():   # channels of similar magnitude now share a group
        assert d["group_min_over_max_after"] > d["group_min_over_max"]


def test_channels_sorted_by_input_absmax():
    block, ctx = _block("llama")
    a, m = block.attentions[0], block.mlps[0]
    kv, rep = a.num_kv_heads, a.num_heads // a.num_kv_heads
    assert rep > 1
    before = ctx.inputs(m.down).abs().amax(0)
    assert not (before[:-1] >= before[1:]).all()
    Reorder().run(block, ReorderConfig(), ctx)
    x = ctx.inputs(m.down).abs().amax(0)
    assert (x[:-1] >= x[1:]).all()
    torch.testing.assert_close(torch.sort(x, descending=True).values, torch.sort(before, descending=True).values)
    # vo: per KV head, the max over the query heads reading it is non-increasing within the head
    xo = ctx.inputs(a.o).abs().amax(0).view(kv, rep, D).amax(1)
    assert (xo[:, :-1] >= xo[:, 1:]).all()


def test_vo_channels_stay_in_their_head():
    block, ctx = _block("llama")
    a, w0 = block.attentions[0], _weights(block)
    Reorder().run(block, ReorderConfig(kinds=("vo",)), ctx)
    w1 = _weights(block)
    v0, v1 = (w[f"{a.v}.weight"].view(a.num_kv_heads, D, -1) for w in (w0, w1))
    o0, o1 = (w[f"{a.o}.weight"].view(-1, a.num_heads, D) for w in (w0, w1))
    for h in range(a.num_kv_heads):
        assert _same_rows(v0[h], v1[h])
    for h in range(a.num_heads):
        assert _same_rows(o0[:, h].T, o1[:, h].T)
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if not k.startswith("self_attn.v_proj")
               and not k.startswith("self_attn.o_proj"))


@pytest.mark.parametrize("spec", [PER_CHANNEL, None])
def test_no_group_quantization_no_change(spec):
    block, ctx = _block("llama", spec)
    w0 = _weights(block)
    res = Reorder().run(block, ReorderConfig(), ctx)
    assert not res.changed and "nothing to reorder" in res.message and len(res.details["skipped"]) == 2
    w1 = _weights(block)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_only_group_quantized_consumers_and_head_sized_groups():
    # down_proj per channel: only vo is reordered; groups holding whole heads: nothing to gain for vo
    block, ctx = _block("llama", specs={"mlp.down_proj": PER_CHANNEL})
    res = Reorder().run(block, ReorderConfig(), ctx)
    assert set(res.details["groups"]) == {"self_attn.o_proj"} and "mlp.down_proj" in res.details["skipped"][0]
    block, ctx = _block("llama", QuantSpec("int4", group_size=D))
    res = Reorder().run(block, ReorderConfig(), ctx)
    assert set(res.details["groups"]) == {"mlp.down_proj"}
    assert any("whole heads" in s for s in res.details["skipped"])


def test_refuses_after_quantization_passes():
    block, ctx = _block("llama")
    block.linears["mlp.down_proj"].clip = torch.ones(1)
    with pytest.raises(ValueError, match="before clip"):
        Reorder().run(block, ReorderConfig(), ctx)


def test_compiler_preserves_logits(tmp_path):
    # through the sequential compiler on a two-layer Llama (GQA) with group specs: the same logits
    model, path = saved_model(tmp_path, "llama")
    lm, states = lazy(path), {}

    def assign(block):
        for lin in block.linears.values():
            lin.spec = G8

    def on_block(block, *_):
        states[block.index] = {k: v.detach().clone() for k, v in block.module.state_dict().items()}

    compile_blocks(lm, [Step("reorder", ReorderConfig())], block0_inputs(lm, calib_ids()), assign_specs=assign,
                   on_block=on_block, progress=False)
    out = rebuild(lm, states)
    assert_same_logits(logits(model), logits(out))
    p = lm.block_prefix(1)
    assert not torch.equal(states[1]["mlp.down_proj.weight"], model.get_parameter(f"{p}.mlp.down_proj.weight"))
