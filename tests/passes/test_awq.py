"""awq: Before/After on tiny decoder layers whose inputs have outlier channels (a norm gain with a few 20x entries).
The scales must leave the float block unchanged, and with quantization they must beat plain RTN."""
import functools

import pytest
import torch

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import Step
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture
from dcc.ir.graph import Block
from dcc.passes.awq import Awq, AwqConfig
from dcc.passes.base import get_pass

from tiny_models import INT4_G32 as SPEC, one_thread, outlier_layer, run_on_copy  # noqa: F401 (one_thread)


@pytest.fixture(scope="module")
def templates():
    """family -> a captured layer 0 whose norms have 20x gains at tiny_models.OUTLIERS (made once, copied per run)."""
    return functools.cache(outlier_layer)


def _run(template, names):
    """Run the passes; returns (relative error of the block output vs the float block, results, block)."""
    block, results, err = run_on_copy(template, [Step(n, get_pass(n).Config()) for n in names])
    return err, results, block


def test_config_validation_and_round_trip():
    assert get_pass("awq") is Awq
    cfg = AwqConfig(grid=8, patterns=("x",), max_tokens=64)
    assert AwqConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"grid": 0}, {"max_tokens": 8}):
        with pytest.raises(ValueError, match="awq"):
            AwqConfig(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        AwqConfig.from_dict({"alpha": 0.5})


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_awq_scales_preserve_the_float_block(templates, family):
    """Only the awq step (no quantization): weights and norm gains change, the block's function does not."""
    t = templates(family)
    before = {k: v.clone() for k, v in t[0].state_dict().items()}
    err, results, block = _run(t, ["awq"])
    res = results[0]
    assert res.changed is True
    groups = res.details["groups"]
    # norm -> q/k/v, norm -> up(/gate), v -> o and up -> down are all found and scaled
    assert len(groups) == 4 and res.details["skipped"] == []
    assert any(g["alpha"] > 0 for g in groups.values())
    after = block.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("norm" in k for k in changed) and any("down_proj" in k or "fc2" in k for k in changed)
    assert all(lin.qtensor is None for lin in block.linears.values())
    assert err < 1e-5, f"{family}: awq changed the float block output by {err:.2e} (relative)"


def test_awq_search_never_worse_than_unscaled(templates):
    """Each group's chosen scale scores at most the loss of s = 1 (the grid starts at alpha = 0)."""
    _, results, _ = _run(templates("llama"), ["awq"])
    groups = results[0].details["groups"]
    for name, g in groups.items():
        assert g["loss"] <= g["loss_rtn"] * (1 + 1e-9), name
    # with 20x outlier channels, the norm groups' search finds a real gain
    norm_groups = [g for k, g in groups.items() if "layernorm" in k]
    assert norm_groups and all(g["loss"] < g["loss_rtn"] for g in norm_groups)


def test_awq_clip_rtn_beats_rtn_on_outlier_channels(templates):
    t = templates("llama")
    err_rtn, _, _ = _run(t, ["rtn"])
    err_awq, _, _ = _run(t, ["awq", "rtn"])
    err_full, results, block = _run(t, ["awq", "clip", "rtn"])
    assert [r.changed for r in results] == [True, False, True]
    assert all(lin.qtensor is not None for lin in block.linears.values())
    # every weight is exactly its quantized value after the full pipeline
    for name, lin in block.linears.items():
        w = block.linear_module(name).weight.data
        assert torch.equal(w, lin.qtensor.dequantize(w.dtype))
    assert err_awq < err_rtn
    assert err_full < err_rtn
    assert err_full < 0.9 * err_rtn, (err_rtn, err_awq, err_full)


def test_awq_skips_norm_without_gain():
    """A norm with no gain cannot absorb a scale: the group is reported as skipped, and nothing changes."""
    class NoGain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(64, elementwise_affine=False)
            self.fc = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    module = NoGain()
    x = torch.randn(2, 16, 64)
    gm, params = capture(module, (x,), {})
    block = Block(0, "custom.0", module)
    analyse(block, gm, params)
    block.linears["fc"].spec = SPEC
    ctx = BlockContext(block, (x,), {}, torch.device("cpu"))
    w0 = module.fc.weight.detach().clone()
    res = Awq().run(block, AwqConfig(), ctx)
    assert res.changed is False and res.details["groups"] == {}
    assert len(res.details["skipped"]) == 1 and "no gain" in res.details["skipped"][0]
    assert torch.equal(module.fc.weight, w0)
