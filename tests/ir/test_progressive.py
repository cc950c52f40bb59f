"""QoQ progressive group quantization: the protective range, the kernel's bounds (q*s2 in one byte, q*s2 - z in
int8) on adversarial weights, exact decoding, and the accuracy it buys over per-channel 4-bit."""
import pytest
import torch

from dcc.ir.formats import QuantSpec, fake_quantize, quant_error, quantize_tensor
from dcc.ir.progressive import int8_weight, level1_codes, level1_params, protective_range

PROG = QuantSpec("int4", symmetric=False, group_size=128, progressive=True)


def _ends_ok(vmin: int, vmax: int, p_post: bool = True) -> bool:
    """Independent check of one integer range through level 1 (post-scale zero), via the library's level 1."""
    x0 = torch.tensor([[float(vmin), float(vmax)]])
    s2, z = level1_params(x0, 2, 4)
    q = level1_codes(x0, s2, z, 2, 4)
    w8 = q.to(torch.int32) * s2.to(torch.int32) - z.to(torch.int32)
    return bool((w8.abs() <= 127).all())


def test_protective_range_values():
    assert protective_range(4, post_scale=True) == 120     # QServe's form: w8 = q*s2 - z
    assert protective_range(4, post_scale=False) == 119
    p = protective_range(4)
    # every integer range inside [-P, P] survives; some range inside [-(P+1), P+1] does not
    assert all(_ends_ok(vmin, vmax) for vmax in range(0, p + 1, 3) for vmin in range(-p, vmax + 1, 3))
    assert all(_ends_ok(vmin, p) for vmin in range(-p, p + 1))
    assert not all(_ends_ok(vmin, vmax) for vmax in range(0, p + 2) for vmin in range(-p - 1, vmax + 1))


def _adversarial(n=512, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0] = 0.0                                    # a dead row
    w[1, :128] = 0.05                             # a constant group
    w[2] = torch.linspace(-1, 1, k)               # full symmetric range in every group
    w[3, :] = 1.0
    w[3, 0] = -1.0                                # one negative outlier, positive group otherwise
    w[4] = w[4].abs() + 0.3                       # all-positive row
    w[5] = -(w[5].abs() + 0.3)                    # all-negative row
    w[6, 5] = 40.0                                # a huge outlier: the other groups collapse to few levels
    w[7] = torch.randn(k, generator=g) * torch.logspace(-6, 2, k)   # wide dynamic range
    w[8:16] = torch.round(w[8:16] * 1000) / 1000  # ties
    rows = torch.rand(n - 16, generator=g) * 4
    w[16:] *= torch.exp(rows).unsqueeze(1)
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_on_adversarial_weights(seed):
    w = _adversarial(seed=seed)
    qt = quantize_tensor(w, PROG)
    assert qt.codes.shape == w.shape and qt.scale0.shape == (w.shape[0], 1) and qt.scale0.dtype == torch.float16
    assert qt.scale.shape == qt.zero.shape == (w.shape[0], 2)
    q, s2, z = qt.codes.to(torch.int32), qt.scale.to(torch.int32), qt.zero.to(torch.int32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert int(s2.min()) >= 1 and int(s2.max()) <= 17 and int(z.abs().max()) <= 127
    prod = q.view(w.shape[0], 2, 128) * s2.unsqueeze(-1)
    assert int(prod.max()) <= 255                                   # q*s2 fits one unsigned byte
    w8 = prod - z.unsqueeze(-1)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127            # and q*s2 - z fits int8
    # the decoded weight is s1 * w8 exactly (float32 holds a 16-bit scale times an 8-bit integer)
    wq = qt.dequantize()
    assert torch.equal(wq, w8.reshape(w.shape).float() * qt.scale0.float())
    assert torch.equal(wq[0], torch.zeros_like(wq[0]))             # a dead row decodes to zeros
    assert bool(torch.isfinite(wq).all())


def test_int8_weight_rejects_out_of_kernel_values():
    codes = torch.full((1, 128), 15, dtype=torch.int16)
    with pytest.raises(ValueError, match="one byte"):
        int8_weight(codes, torch.tensor([[18]]), torch.tensor([[0]]), 128)      # 15 * 18 = 270
    with pytest.raises(ValueError, match="int8"):
        int8_weight(codes, torch.tensor([[16]]), torch.tensor([[-10]]), 128)    # 240 + 10 = 250


def test_progressive_between_per_channel_and_plain_groups():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 512, generator=g) * torch.exp(torch.randn(1, 512, generator=g))   # uneven columns
    prog = quant_error(w, quantize_tensor(w, PROG).dequantize())["sqnr_db"]
    chan = quant_error(w, fake_quantize(w, QuantSpec("int4", group_size=0, zero_mode="offset")))["sqnr_db"]
    group = quant_error(w, fake_quantize(w, QuantSpec("int4", group_size=128, zero_mode="float")))["sqnr_db"]
    assert chan + 1.0 < prog < group + 0.5, (chan, prog, group)


def test_clip_shrinks_level1_ranges():
    w = _adversarial(seed=5)
    full = quantize_tensor(w, PROG)
    clipped = quantize_tensor(w, PROG, clip=0.8)
    assert torch.equal(full.scale0, clipped.scale0)                  # level 0 is not clipped
    assert bool((clipped.scale <= full.scale).all()) and bool((clipped.scale < full.scale).any())


def test_spec_validation():
    for bad in (dict(dtype="int8"), dict(symmetric=True), dict(group_size=0), dict(zero_mode="float"),
                dict(dtype="fp4_e2m1")):
        with pytest.raises(ValueError, match="progressive"):
            QuantSpec(**{**dict(dtype="int4", group_size=128, progressive=True), **bad})
    assert "progressive" in PROG.short()
    assert QuantSpec.from_dict(PROG.to_dict()) == PROG


def test_fast_fake_quant_matches_exact_path():
    from dcc.ir.formats import fake_quantize_fast
    w = _adversarial(seed=7)
    clip = torch.rand(w.shape[0], 2, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    assert torch.equal(fake_quantize_fast(w, PROG, clip), quantize_tensor(w, PROG, clip).dequantize())
