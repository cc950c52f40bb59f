"""gptq: Before/After against RTN on correlated inputs (low rank + noise), where spreading the rounding error over
the not-yet-quantized columns pays off; plus the pass on a tiny Llama layer and the config contract."""
import pytest
import torch

from dcc.compiler.pass_manager import Step
from dcc.ir.formats import QuantSpec, fake_quantize
from dcc.passes.base import get_pass
from dcc.passes.gptq import Gptq, GptqConfig, gptq_quantize, hessian
from dcc.passes.rtn import RtnConfig

from tiny_models import INT4_G32 as SPEC, one_thread, outlier_layer, run_on_copy  # noqa: F401 (one_thread)


def _correlated(t=512, k=128, n=64, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    return w, x


def _out_err(x, w, wq):
    return float((x @ wq.T - x @ w.T).norm())


# ------------------------------------------------------------------------------------------------ config

def test_config_validation():
    assert get_pass("gptq") is Gptq
    for bad in ({"damp": -0.1}, {"damp": 1.0}, {"block_size": 0}, {"act_order": True, "static_groups": False}):
        with pytest.raises(ValueError, match="gptq"):
            GptqConfig(**bad)
    GptqConfig(act_order=False, static_groups=False)   # valid: no reordering, no need for static groups
    GptqConfig(damp=0.0)


def test_config_round_trip_and_unknown_key():
    cfg = GptqConfig(damp=0.05, block_size=16, act_order=False, static_groups=True)
    d = cfg.to_dict()
    assert d == {"damp": 0.05, "block_size": 16, "act_order": False, "static_groups": True}
    assert GptqConfig.from_dict(d) == cfg
    assert GptqConfig.from_dict({}) == GptqConfig()
    with pytest.raises(ValueError, match="unknown option.*percdamp"):
        GptqConfig.from_dict({"percdamp": 0.01})
    step = Step("gptq", cfg)
    assert Step.from_dict(step.to_dict()) == step


# --------------------------------------------------------------------------------------- gptq_quantize

@pytest.mark.parametrize("spec", [
    SPEC,
    QuantSpec("int4", symmetric=True, group_size=0),
    QuantSpec("int3", symmetric=False, group_size=-1),
], ids=lambda s: s.short())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    w, x = _correlated()
    qt = gptq_quantize(w, x, spec, GptqConfig(act_order=act_order, block_size=32))
    assert qt.spec == spec and qt.codes.shape == w.shape and qt.codes.dtype == torch.int16
    assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    wq = qt.dequantize()
    assert bool(torch.isfinite(wq).all())
    e_gptq, e_rtn = _out_err(x, w, wq), _out_err(x, w, fake_quantize(w, spec))
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    # GPTQ trades weight error for output error: the weights themselves are further from w than RTN's
    assert float((wq - w).norm()) > float((fake_quantize(w, spec) - w).norm())


def test_gptq_scales_are_static_groups_of_the_float_weight():
    from dcc.ir.formats import compute_qparams

    w, x = _correlated()
    qt = gptq_quantize(w, x, SPEC, GptqConfig())
    s, z = compute_qparams(w, SPEC)
    assert torch.equal(qt.scale, s) and torch.equal(qt.zero, z)


def test_gptq_act_order_helps_and_block_size_does_not_matter():
    w, x = _correlated(seed=3)
    x[:, :16] *= 10.0      # a few very active input channels: act-order quantizes them first
    cfg = GptqConfig(act_order=True)
    a = gptq_quantize(w, x, SPEC, cfg)
    b = gptq_quantize(w, x, SPEC, GptqConfig(act_order=True, block_size=7))
    # lazy batch updates are an exact reordering of the same arithmetic (up to float64 rounding)
    assert float((a.codes != b.codes).float().mean()) < 0.01
    plain = gptq_quantize(w, x, SPEC, GptqConfig(act_order=False))
    assert _out_err(x, w, a.dequantize()) < _out_err(x, w, plain.dequantize())


def test_gptq_dead_input_columns():
    spec = QuantSpec("int4", symmetric=False, group_size=32)    # integer zero mode: the zero code decodes to 0
    w, x = _correlated()
    dead = [5, 40, 41, 100]
    x[:, dead] = 0.0
    qt = gptq_quantize(w, x, spec, GptqConfig())
    wq = qt.dequantize()
    assert bool(torch.isfinite(wq).all())
    assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 15
    # a column no input ever reaches is set to zero and quantized to the zero point
    groups = torch.tensor(dead) // 32
    assert torch.equal(qt.codes[:, dead], qt.zero[:, groups])
    assert bool((wq[:, dead] == 0).all())
    assert _out_err(x, w, wq) < _out_err(x, w, fake_quantize(w, spec))


def test_a_shared_hessian_gives_the_same_codes_and_is_left_unchanged():
    # the pass computes H once for linears reading one tensor (q/k/v): gptq_quantize must not change the H it is given
    w, x = _correlated()
    x[:, [3, 9]] = 0.0      # dead columns: their diagonal is set to 1 on gptq_quantize's copy, not on the caller's
    h = hessian(x)
    kept = h.clone()
    a, b = gptq_quantize(w, x, SPEC, GptqConfig()), gptq_quantize(w, None, SPEC, GptqConfig(), h=h)
    assert torch.equal(h, kept) and float(h[3, 3]) == 0.0
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_gptq_all_inputs_dead_is_exact_zero_output():
    w, _ = _correlated()
    x = torch.zeros(64, w.shape[1])
    qt = gptq_quantize(w, x, QuantSpec("int4", symmetric=True, group_size=32), GptqConfig())
    assert bool((qt.codes == 0).all()) and bool((qt.dequantize() == 0).all())


def test_gptq_dynamic_groups_differ_from_static():
    w, x = _correlated()
    static = gptq_quantize(w, x, SPEC, GptqConfig(act_order=False, static_groups=True))
    dynamic = gptq_quantize(w, x, SPEC, GptqConfig(act_order=False, static_groups=False))
    # dynamic groups take each group's scale from the error-updated weights when the sweep reaches the group
    assert not torch.equal(static.scale[:, 1:], dynamic.scale[:, 1:])


# ---------------------------------------------------------------------------------------------- the pass

@pytest.fixture(scope="module")
def template():
    """Layer 0 of a one-layer Llama whose norm gains are 20 at input channels 3, 17 and 40 (tiny_models.OUTLIERS)."""
    return outlier_layer("llama")


def test_gptq_pass_on_a_block_beats_rtn(template):
    block, results, err_gptq = run_on_copy(template, [Step("gptq", GptqConfig())])
    _, _, err_rtn = run_on_copy(template, [Step("rtn", RtnConfig())])
    assert results[0].changed is True
    assert set(results[0].details["sqnr_db"]) == set(block.linears)
    for name, lin in block.linears.items():
        qt = lin.qtensor
        assert qt is not None and qt.spec == SPEC
        w = block.linear_module(name).weight.data
        assert torch.equal(w, qt.dequantize(w.dtype))
        assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 15
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_gptq_progressive_two_levels():
    """QoQ's two-level spec: both levels static from the float weight; codes stay inside the kernel's bounds and
    GPTQ beats RTN of the same spec."""
    from dcc.ir.formats import progressive_qparams, quantize_tensor

    spec = QuantSpec("int4", symmetric=False, group_size=64, progressive=True)
    w, x = _correlated()
    qt = gptq_quantize(w, x, spec, GptqConfig(block_size=32))
    s1, _, s2, z = progressive_qparams(w, spec)
    assert torch.equal(qt.scale0, s1) and torch.equal(qt.scale, s2) and torch.equal(qt.zero, z)
    wq = qt.dequantize()   # raises if any q*s2 - z left int8
    e_gptq, e_rtn = _out_err(x, w, wq), _out_err(x, w, quantize_tensor(w, spec).dequantize())
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, x, spec, GptqConfig(act_order=False, static_groups=False))


def test_gptq_offset_zero_matches_rtn_decode():
    """zero_mode 'offset' (QServe per-channel: q*s - szero in the epilogue) decodes exactly as formats does."""
    spec = QuantSpec("int4", symmetric=False, group_size=0, zero_mode="offset")
    w, x = _correlated()
    qt = gptq_quantize(w, x, spec, GptqConfig(block_size=32))
    from dcc.ir.formats import dequantize
    assert torch.equal(qt.dequantize(), dequantize(qt.codes, qt.scale, qt.zero, spec))
    assert _out_err(x, w, qt.dequantize()) < _out_err(x, w, fake_quantize(w, spec))


@pytest.mark.parametrize("spec", [QuantSpec("fp4_e2m1", group_size=16, scale_dtype="bfloat16", micro_scale="fp8_e4m3"),
                                  QuantSpec("fp4_e2m1", group_size=32, scale_dtype="bfloat16")])
def test_gptq_fp4_static_scales_and_codes(spec):
    """NVFP4 (e4m3 micro-scales under a per-tensor scale) and one-level fp4: the scales are the RTN ones of the
    float weight, the codes e2m1 bit patterns that decode to what the sweep used, and GPTQ beats RTN."""
    from dcc.ir.formats import compute_qparams, quantize_tensor, two_level_qparams

    w, x = _correlated()
    qt = gptq_quantize(w, x, spec, GptqConfig(block_size=32))
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 15
    if spec.micro_scale:
        s0, micro = two_level_qparams(w, spec)
        assert torch.equal(qt.scale0, s0) and torch.equal(qt.scale, micro)
    else:
        assert torch.equal(qt.scale, compute_qparams(w, spec)[0]) and qt.scale0 is None
    e_gptq, e_rtn = _out_err(x, w, qt.dequantize()), _out_err(x, w, quantize_tensor(w, spec).dequantize())
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, x, spec, GptqConfig(act_order=False, static_groups=False))


@pytest.mark.parametrize("spec", [QuantSpec("int4", symmetric=False, group_size=64, progressive=True),
                                  QuantSpec("int4", symmetric=False, group_size=0, zero_mode="offset"),
                                  QuantSpec("int4", symmetric=False, group_size=32, zero_mode="float"),
                                  QuantSpec("fp4_e2m1", group_size=16, scale_dtype="bfloat16", micro_scale="fp8_e4m3")])
def test_block_replay_logic_equals_the_eager_sweep(spec, monkeypatch):
    """The GPU's graphed sweep (passes/_gptq_graph.py) run uncaptured on the CPU: static buffers filled per block,
    the quantizer's group parameters gathered to the block's columns, codes scattered back by the permutation, and a
    partial last block left to the eager loop -- the same codes and scales as the eager sweep."""
    from dcc.passes import _gptq_graph, gptq
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 320, generator=g) * 0.05
    x = torch.randn(512, 320, generator=g) * torch.rand(320, generator=g) * 3
    cfg = GptqConfig(block_size=128)   # 320 = two captured blocks and a partial one of 64 columns
    want = gptq_quantize(w, x, spec, cfg)
    monkeypatch.setattr(gptq, "GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(_gptq_graph._Graph, "capture", lambda self: None)
    monkeypatch.setattr(_gptq_graph, "_GRAPHS", {})
    calls = []
    real = _gptq_graph.sweep_graphed
    monkeypatch.setattr(gptq, "sweep_graphed", lambda *a: calls.append(real(*a)) or calls[-1])
    got = gptq_quantize(w, x, spec, cfg)
    assert calls == [256]
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    assert (got.zero is None and want.zero is None) or torch.equal(got.zero, want.zero)


def test_the_tf32_part_and_the_rest_add_up_exactly():
    from dcc.ir.gpu_matmul import tf32_part as _tf32_part
    v = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    hi = _tf32_part(v)
    assert torch.equal(hi + (v - hi), v)
    # hi keeps 10 mantissa bits: its low 13 bits are zero, and it is within 2^-10 of v
    assert int((hi.view(torch.int32) & 8191).abs().sum()) == 0
    assert bool(((v - hi).abs() <= v.abs() * 2.0 ** -10).all())
