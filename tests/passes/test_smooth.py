"""smooth: Before/After on tiny saved Llama (GQA), Gemma and OPT (LayerNorm + bias, ReLU MLP) models; the smoothed
model computes the same logits, and at alpha = 0.5 every smoothed channel's activation and weight maxima meet."""

import pytest
import torch

from dcc.compiler.pass_manager import Step
from dcc.passes.base import get_pass
from dcc.passes.fuse_norms import FuseNormsConfig
from dcc.passes.smooth import Smooth, SmoothConfig, smooth_scale


from tiny_models import assert_same_logits, calib_ids, logits, run_and_rebuild, saved_model


def test_registered_and_config():
    assert get_pass("smooth") is Smooth and "smoothed" in Smooth.ensures
    c = SmoothConfig(alpha=0.8, groups=("norm", "mlp"))
    assert SmoothConfig.from_dict(c.to_dict()) == c
    # a YAML list becomes the tuple
    assert SmoothConfig.from_dict({"groups": ["vo"]}).groups == ("vo",)
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"groups": ("qk",)}, {"groups": ()}):
        with pytest.raises(ValueError, match="smooth"):
            SmoothConfig(**bad)


def test_smooth_scale_formula():
    x, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smooth_scale(x, w, 0.5)
    torch.testing.assert_close(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0   # a dead channel is clamped, not zeroed
    torch.testing.assert_close(smooth_scale(x, w, 1.0)[:2], x[:2])


def _weights_changed(model, smoothed, names):
    ref = dict(model.named_parameters())
    got = dict(smoothed.named_parameters())
    return {n for n in names if not torch.allclose(ref[n], got[n])}


@pytest.mark.parametrize("arch", ["llama", "gemma", "opt"])
def test_smooth_preserves_logits(tmp_path, arch):
    model, path = saved_model(tmp_path, arch)
    lm, smoothed, states, blocks = run_and_rebuild(path, [Step("smooth", SmoothConfig(alpha=0.5))])
    assert_same_logits(logits(model), logits(smoothed))
    block = blocks[0]
    every = [f"{block.prefix}.{n}.weight" for n in block.linears]
    assert _weights_changed(model, smoothed, every) == set(every)   # every linear is in some group
    norms = [f"{block.prefix}.{g.weight}" for g in block.norms]
    assert _weights_changed(model, smoothed, norms) == set(norms)


def test_smooth_balances_maxima_at_alpha_half(tmp_path):
    # s = sqrt(max|x| / max|W|) makes max|x / s| == max|W s| on every channel (up -> down has one consumer)
    model, path = saved_model(tmp_path, "llama")
    lm, smoothed, states, blocks = run_and_rebuild(path, [Step("smooth", SmoothConfig(alpha=0.5, groups=("mlp",)))])
    down = smoothed.model.layers[0].mlp.down_proj
    seen = {}
    h = down.register_forward_hook(lambda m, a, o: seen.update(x=a[0].reshape(-1, a[0].shape[-1])))
    logits(smoothed, calib_ids())   # the calibration batch the pass measured
    h.remove()
    x_max, w_max = seen["x"].abs().amax(0), down.weight.abs().amax(0)
    torch.testing.assert_close(x_max, w_max, rtol=1e-4, atol=1e-6)
    # and it was not so before
    down0 = model.model.layers[0].mlp.down_proj
    assert not torch.allclose(down0.weight.abs().amax(0), w_max, rtol=1e-2)


def test_smooth_only_selected_groups(tmp_path):
    model, path = saved_model(tmp_path, "llama")
    lm, smoothed, states, blocks = run_and_rebuild(path, [Step("smooth", SmoothConfig(groups=("vo",)))])
    assert_same_logits(logits(model), logits(smoothed))
    p = blocks[0].prefix
    names = [f"{p}.{n}.weight" for n in blocks[0].linears] + [f"{p}.{g.weight}" for g in blocks[0].norms]
    assert _weights_changed(model, smoothed, names) == {f"{p}.self_attn.v_proj.weight", f"{p}.self_attn.o_proj.weight"}


def test_smooth_after_fuse_norms_on_layernorm(tmp_path):
    # fused LayerNorms (gain 1, bias 0, mean subtraction kept) still absorb the scale
    model, path = saved_model(tmp_path, "opt")
    steps = [Step("fuse_norms", FuseNormsConfig()), Step("smooth", SmoothConfig(alpha=0.7))]
    lm, out, states, blocks = run_and_rebuild(path, steps)
    assert_same_logits(logits(model), logits(out))
    g = blocks[0].norms[0]
    assert not torch.allclose(states[0][g.weight], torch.ones(64))


# ------------------------------------------------------------------------------------------ alpha/beta search

def test_beta_and_config_round_trip():
    c = SmoothConfig(alpha=0.3, beta=0.7, search=True, grid=5, samples=2, groups=("vo", "mlp"))
    assert SmoothConfig.from_dict(c.to_dict()) == c and c.exponents(0.3) == (0.3, 0.7)
    assert SmoothConfig(alpha=0.3).exponents(0.3) == (0.3, 0.7) and SmoothConfig(beta=0.0).exponents(0.6) == (0.6, 0.0)
    x, w = torch.tensor([4.0]), torch.tensor([16.0])
    torch.testing.assert_close(smooth_scale(x, w, 0.5, 0.25), torch.tensor([1.0]))   # 4^0.5 / 16^0.25
    for bad in ({"beta": 1.5}, {"grid": 0}, {"samples": 0}, {"alpha": True}):
        with pytest.raises(ValueError, match="smooth"):
            SmoothConfig(**bad)


def _w4a8_block():
    from dcc.ir.formats import QuantSpec
    from tiny_models import fresh_block, outlier_layer
    spec = QuantSpec("int4", symmetric=False, group_size=0, zero_mode="offset")
    block, ctx = fresh_block(outlier_layer(), spec)
    for lin in block.linears.values():
        lin.act = "int8"
    return block, ctx


def test_search_picks_the_smallest_quantized_block_error():
    from dcc.passes._scoring import BlockScorer
    block, ctx = _w4a8_block()
    ref = ctx.forward().clone()
    res = Smooth().run(block, SmoothConfig(search=True, grid=4, samples=2, groups=("vo", "mlp")), ctx)
    groups = res.details["groups"]
    assert {d["kind"] for d in groups.values()} == {"vo", "mlp"}
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-4, atol=1e-4)
    # the chosen configuration scores at most what any other alpha (and no smoothing) scores: re-score them
    errs = {}
    for alpha in (None, 0.0, 0.25, 0.5, 0.75):
        b, c = _w4a8_block()
        if alpha is not None:
            Smooth().run(b, SmoothConfig(alpha=alpha, groups=("vo", "mlp"), verify=False), c)
        errs[alpha] = BlockScorer(b, c, 2).error(list(b.linears))
    b, c = _w4a8_block()
    Smooth().run(b, SmoothConfig(search=True, grid=4, samples=2, groups=("vo", "mlp"), verify=False), c)
    searched = BlockScorer(b, c, 2).error(list(b.linears))
    assert searched <= min(errs.values()) * 1.0001, (searched, errs)
