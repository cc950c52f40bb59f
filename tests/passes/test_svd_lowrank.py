"""svd_lowrank (SVDQuant): the float function is kept (R + branch == W·diag(lambda), read by x / lambda), the branch
is a graph rewrite the block runs, and with W4A4 fake quantization the group error falls from smoothing alone to
the branch and with the alternations."""
import pytest
import torch

from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.formats import QuantSpec
from dcc.passes.quantize_activations import QuantizeActivationsConfig
from dcc.passes.rtn import RtnConfig
from dcc.passes.svd_lowrank import SvdLowrankConfig, top_components

from tiny_models import fresh_block, outlier_layer

TEMPLATE = outlier_layer()
W4 = QuantSpec("int4", symmetric=True, group_size=64, scale_dtype="bfloat16")


def _block():
    block, ctx = fresh_block(TEMPLATE, spec=W4)
    for lin in block.linears.values():
        lin.act = "int4:bfloat16"
    return block, ctx


def test_branch_keeps_the_float_function_and_is_in_the_graph():
    block, ctx = _block()
    ref = ctx.forward().clone()
    res, = run_block(block, [Step("svd_lowrank", SvdLowrankConfig(rank=16, grid=4))], ctx, PassTiming(), debug=True)
    assert res.changed and res.details["output_rel_err"] < 1e-4   # the manager's preservation check, under debug
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-4, atol=1e-5)
    q = block.linear_module("self_attn.q_proj")
    assert q.lora_down.shape == (16, 64) and q.lora_up.shape == (64, 16) and q.smooth.shape == (64,)
    # q/k/v read one tensor: one smoothing factor
    assert torch.equal(q.smooth, block.linear_module("self_attn.v_proj").smooth)
    assert sum(n.target == "div" for n in block.nodes) == len(block.linears)
    groups = [d for d in res.details.values() if isinstance(d, dict)]
    assert len(groups) == 4   # q/k/v, o, gate/up, down
    for d in groups:
        assert d["error"] <= d["error_first_svd"] <= d["error_unsmoothed"]


def test_branch_lowers_the_w4a4_error_of_the_block():
    errs = {}
    for rank in (0, 32):
        block, ctx = _block()
        ref = ctx.forward().clone()
        steps = [Step("svd_lowrank", SvdLowrankConfig(rank=rank, grid=4)),
                 Step("quantize_activations", QuantizeActivationsConfig()), Step("rtn", RtnConfig())]
        run_block(block, steps, ctx, PassTiming())
        out = ctx.forward(simulate=True)
        errs[rank] = float((out - ref).norm() / ref.norm())
    assert errs[32] < errs[0] < 1


def test_top_components_match_the_full_svd_and_config_checks():
    for k in (64, 4160):   # the Gram-matrix path, and the randomized one for K > 4096
        w = torch.randn(96, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        w[:, :4] *= 30   # a few strong directions, as outlier channels make
        u1, d1 = top_components(w, 16, "full", 0)
        full = torch.linalg.matrix_norm(w - u1 @ d1)
        for method in ("lowrank", "randomized"):
            u2, d2 = top_components(w, 16, method, 0)
            fast = torch.linalg.matrix_norm(w - u2 @ d2)
            assert full * (1 - 1e-9) <= fast <= full * 1.05, (k, method)
            assert torch.equal(u2, top_components(w, 16, method, 0)[0])   # reproducible
    with pytest.raises(ValueError, match="rank must be a multiple of 16"):
        SvdLowrankConfig(rank=24)
    with pytest.raises(ValueError, match="svd must be"):
        SvdLowrankConfig(svd="exact")


def test_smoothing_candidates_cover_both_exponent_patterns():
    from dcc.passes.svd_lowrank import candidates
    x_max = torch.tensor([1.0, 4.0, 100.0, 0.5], dtype=torch.float64)
    w_max = torch.tensor([0.2, 0.1, 0.05, 0.3], dtype=torch.float64)
    paired = candidates(x_max, w_max, SvdLowrankConfig(grid=4))
    both = candidates(x_max, w_max, SvdLowrankConfig(grid=4, exponents="both"))
    act = candidates(x_max, w_max, SvdLowrankConfig(grid=4, exponents="activation"))
    assert [a for a, _ in paired] == [None, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(act) == 1 + 4 and len(both) == len(paired) + 4
    # AWQ's pattern: lambda proportional to max|x|^alpha (centred), whatever the weights
    lam = dict(act)["x^0.5"]
    ratio = lam / x_max.sqrt()
    torch.testing.assert_close(ratio, ratio[0].expand(4))
    assert torch.equal(dict(both)["x^0.5"], lam) and torch.equal(paired[0][1], torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="exponents"):
        SvdLowrankConfig(exponents="beta")


def test_output_refit_recovers_a_low_rank_output_error():
    """refit="output": the branch is the rank-r map of the input that best reproduces the main branch's output
    error, activation rounding included; where that error is exactly a rank-r map of x / lam, it is found."""
    from dcc.passes.svd_lowrank import _Group

    class G(_Group):   # the regression alone, on given rows (no block)
        def __init__(self, x, w):
            self.x, self.w, self.ref, self.act = x, w, x @ w.T, None

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen, dtype=torch.float64)
    w = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    b = torch.randn(48, 16, generator=gen, dtype=torch.float64) @ torch.randn(16, 64, generator=gen,
                                                                              dtype=torch.float64)
    g = G(x, w)
    lam = torch.ones(64, dtype=torch.float64)
    up, down = g.output_fit(lam, w - b, rank=16, damp=1e-9)   # the main branch misses x b^T
    assert up.shape == (48, 16) and down.shape == (16, 64)
    torch.testing.assert_close(down @ down.T, torch.eye(16, dtype=torch.float64))   # orthonormal rows
    torch.testing.assert_close(up @ down, b, rtol=1e-6, atol=1e-6)
    # where the error is not low-rank, the output fit is the best rank-r map on these rows; the weight-space refit
    # (the SVD of the missed weight) spends rank on input channels that carry nothing here
    full = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    xs = x.clone()
    xs[:, 32:] = 0
    g2 = G(xs, w)
    up2, down2 = g2.output_fit(lam, w - full, rank=16, damp=1e-9)
    y_err = float(((xs @ (up2 @ down2 - full).T) ** 2).sum())
    u, d = top_components(full, 16, "full", 0)
    w_err = float(((xs @ (u @ d - full).T) ** 2).sum())
    assert y_err < 0.9 * w_err
    assert SvdLowrankConfig(refit="output").refit == "output"
    with pytest.raises(ValueError, match="refit"):
        SvdLowrankConfig(refit="input")
    with pytest.raises(ValueError, match="damp"):
        SvdLowrankConfig(damp=0)
