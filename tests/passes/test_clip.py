"""clip: Before/After on a tiny Llama layer with outlier input channels. Ratios come from the grid, lie in
[min_ratio, 1], leave the float weights alone, and never increase a layer's output error."""
import pytest
import torch

from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.formats import QuantSpec, compute_qparams, fake_quantize
from dcc.passes.base import get_pass
from dcc.passes.clip import Clip, ClipConfig, search_clip
from dcc.passes.rtn import RtnConfig

from tiny_models import INT4_G32 as SPEC, fresh_block, one_thread, outlier_layer  # noqa: F401 (one_thread)


@pytest.fixture(scope="module")
def template():
    """Layer 0 of a one-layer Llama whose norm gains are 20 at input channels 3, 17 and 40 (tiny_models.OUTLIERS)."""
    return outlier_layer("llama")


def _group_errors(w, x, spec, clip):
    """Per (row, group) ||(Q(W) - W)_g x_g||^2 summed over tokens, computed directly (no Gram matrix)."""
    d = fake_quantize(w, spec, clip) - w
    n, k = w.shape
    gs = spec.group_size if spec.group_size > 0 else k
    return torch.stack([x[:, g * gs:(g + 1) * gs] @ d[:, g * gs:(g + 1) * gs].T for g in range(k // gs)],
                       dim=-1).pow(2).sum(0)  # [N, G]


def test_config_validation_and_round_trip():
    assert get_pass("clip") is Clip
    cfg = ClipConfig(grid=10, min_ratio=0.6, skip_qk=False)
    assert ClipConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"grid": 0}, {"min_ratio": 0.0}, {"min_ratio": 1.0}, {"min_ratio": 1.5}):
        with pytest.raises(ValueError, match="clip"):
            ClipConfig(**bad)


def test_clip_ratios_in_range_and_weights_untouched(template):
    block, ctx = fresh_block(template)
    before = {n: block.linear_module(n).weight.data.clone() for n in block.linears}
    cfg = ClipConfig(grid=10, min_ratio=0.6)
    res = Clip().run(block, cfg, ctx)
    assert res.changed is False
    att = block.attentions[0]
    assert block.linears[att.q].clip is None and block.linears[att.k].clip is None
    clipped = [n for n, l in block.linears.items() if l.clip is not None]
    assert sorted(clipped) == sorted(set(block.linears) - {att.q, att.k}) == sorted(res.details)
    grid = torch.tensor([1.0 - i * (1.0 - cfg.min_ratio) / cfg.grid for i in range(cfg.grid)])
    below_one = 0
    for name in clipped:
        lin = block.linears[name]
        r = lin.clip
        assert r.shape[:2] == (lin.out_features, lin.in_features // 32)   # [N, G, 2]: (min, max) ratios (asym spec)
        assert float(r.min()) >= cfg.min_ratio and float(r.max()) <= 1.0
        # every ratio is a grid point
        assert bool((r.reshape(-1, 1) - grid.view(1, -1)).abs().min(1).values.max() < 1e-6)
        below_one += int((r < 1).sum())
        assert torch.equal(block.linear_module(name).weight.data, before[name])
    assert below_one > 0, "the search never shrank a range"


def test_clip_never_increases_layer_output_error(template):
    block, ctx = fresh_block(template)
    Clip().run(block, ClipConfig(), ctx)
    for name, lin in block.linears.items():
        if lin.clip is None:
            continue
        w = block.linear_module(name).weight.data.float()
        x = ctx.inputs(name)
        r = lin.clip
        # the objective: per row and group, the chosen ratio is no worse than 1.0 (a grid point). The search may
        # score candidates with a float32 decode that differs from the exact "scaled" decode by one fp16 rounding
        # (fake_quantize_fast), so a near-tie can tip the other way by about 1% under the exact decode.
        e_clip, e_none = _group_errors(w, x, SPEC, r), _group_errors(w, x, SPEC, 1.0)
        assert bool((e_clip <= e_none * 1.02 + 1e-9).all()), name
        assert float(e_clip.sum()) < float(e_none.sum()), name
        # and the layer's whole output error
        ref = x @ w.T
        out_clip = float((x @ fake_quantize(w, SPEC, r).T - ref).norm())
        out_none = float((x @ fake_quantize(w, SPEC).T - ref).norm())
        assert out_clip <= out_none, (name, out_clip, out_none)


def test_clip_then_rtn_quantizes_with_the_ratios(template):
    block, ctx = fresh_block(template)
    run_block(block, [Step("clip", ClipConfig(skip_qk=False)), Step("rtn", RtnConfig())], ctx, PassTiming())
    shrunk = 0
    for name, lin in block.linears.items():
        r = lin.clip    # skip_qk=False: q and k are clipped too
        w = block.linear_module(name).weight.data
        assert torch.equal(w, lin.qtensor.dequantize(w.dtype))
        assert int(lin.qtensor.codes.min()) >= 0 and int(lin.qtensor.codes.max()) <= 15
        if bool((r < 1).any()):
            float_scale, _ = compute_qparams(template[0].get_submodule(name).weight.data, SPEC)
            assert not torch.equal(lin.qtensor.scale, float_scale)
            shrunk += 1
    assert shrunk > 0


def test_search_clip_on_heavy_tailed_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(16, 64, generator=g) * 0.02
    w[torch.arange(16), torch.randint(0, 64, (16,), generator=g)] = 0.3   # one outlier weight per row
    cfg = ClipConfig(grid=20, min_ratio=0.5)
    for spec, shape in ((SPEC, (16, 2, 2)), (QuantSpec("int4", symmetric=True, group_size=0), (16, 1)),
                        (QuantSpec("int4", symmetric=True, group_size=-1), (1, 1))):
        ratios, before, after = search_clip(w, x, spec, cfg)
        assert tuple(ratios.shape) == shape
        assert float(ratios.min()) >= cfg.min_ratio and float(ratios.max()) <= 1.0
        assert after <= before
        if spec.group_size >= 0:
            # the returned errors are the per-group objective, summed (mean over tokens), for the ratios returned
            assert after == pytest.approx(float(_group_errors(w, x, spec, ratios).sum()) / x.shape[0], rel=1e-3)
            assert before == pytest.approx(float(_group_errors(w, x, spec, 1.0).sum()) / x.shape[0], rel=1e-3)
            assert after < before
