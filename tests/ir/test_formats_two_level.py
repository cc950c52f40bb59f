"""Two-level fp scales (NVFP4 weights): e2m1 codes per 16-group with an fp8 e4m3 micro-scale under one 16-bit
per-tensor scale, chosen as DeepCompressor does; the spec, the scales by hand, the exact decode, the fast fake
quantization, and the float32 path of round_to_fp."""
import pytest
import torch

from dcc.ir.formats import (QuantSpec, compute_qparams, fake_quantize_fast, fp_decode, fp_encode, quant_error,
                            quantize_tensor, round_to_fp, two_level_qparams)

NVFP4 = QuantSpec("fp4_e2m1", group_size=16, scale_dtype="bfloat16", micro_scale="fp8_e4m3")


def _w(n=8, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def test_spec_fields_dict_and_checks():
    assert QuantSpec.from_dict(NVFP4.to_dict()) == NVFP4 and NVFP4.to_dict()["micro_scale"] == "fp8_e4m3"
    assert "micro_scale" not in QuantSpec("int4").to_dict()          # one-level specs keep their dict
    assert NVFP4.symmetric and NVFP4.bits == 4 and NVFP4.qmax == 6.0
    assert NVFP4.short() == "fp4_e2m1 g16 e4m3 x bf16 per-tensor"
    for kw in (dict(dtype="int4"), dict(group_size=0), dict(group_size=-1), dict(micro_scale="fp4_e2m1"),
               dict(micro_scale="e4m3")):
        with pytest.raises(ValueError, match="micro_scale"):
            QuantSpec(**{**NVFP4.to_dict(), **kw})
    with pytest.raises(ValueError, match="two_level_qparams"):
        compute_qparams(_w(), NVFP4)


def test_scales_codes_and_decode_by_hand():
    w = torch.zeros(2, 32)
    w[0, :16] = torch.linspace(-168, 168, 16)   # amax 168: s_g = 28, the largest; s0 = 28 / 448 = 1/16 exactly
    w[0, 16] = 6.0                              # amax 6: s_g = 1, micro = 16
    w[0, 17] = 3.0
    w[1, 0] = 0.6                               # s_g = 0.1: micro = RNE_e4m3(1.6) = 1.625; 0.6 / (1.625 / 16) -> 6
    s0, micro = two_level_qparams(w, NVFP4)
    assert s0.dtype == torch.bfloat16 and float(s0) == 1 / 16
    assert micro.tolist() == [[448.0, 16.0], [1.625, 1.0]]   # the all-zero group gets 1
    qt = quantize_tensor(w, NVFP4)
    assert qt.codes.dtype == torch.uint8 and torch.equal(qt.scale, micro) and torch.equal(qt.scale0, s0)
    deq = qt.dequantize()
    assert deq[0, 0] == -168 and deq[0, 15] == 168 and deq[0, 16] == 6 and deq[0, 17] == 3
    assert deq[1, 0] == 6 * 1.625 / 16 and float(deq[1, 1:].abs().max()) == 0
    # the decode is element * micro * s0, exact; the codes are the RNE element of w / (micro * s0)
    div = (micro * s0.float()).repeat_interleave(16, 1)
    assert torch.equal(deq, fp_decode(qt.codes, "fp4_e2m1") * div)
    assert torch.equal(qt.codes, fp_encode(w / div, "fp4_e2m1"))


def test_all_zero_tiny_groups_and_clip():
    s0, micro = two_level_qparams(torch.zeros(3, 32), NVFP4)
    assert float(s0) == 1 and bool((micro == 1).all())
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 1000.0, 1e-6           # the small group's micro-scale underflows e4m3: its smallest subnormal
    s0, micro = two_level_qparams(w, NVFP4)
    assert float(micro[0, 1]) == 2.0 ** -9
    qt = quantize_tensor(w, NVFP4)
    assert float(qt.dequantize()[0, 16]) == 0.0 and float(qt.dequantize()[0, 0]) == pytest.approx(1000, rel=2 ** -8)
    # clip shrinks each group's scale before the levels are split: a uniform one only moves s0
    w = _w(4, 64)
    s1, m1 = two_level_qparams(w, NVFP4)
    s09, m09 = two_level_qparams(w, NVFP4, 0.9)
    assert float(s09) == pytest.approx(0.9 * float(s1), rel=2 ** -8) and torch.equal(m09, m1)
    clip = torch.ones(4, 4)
    clip[0, 0] = 0.5
    s0, mc = two_level_qparams(w, NVFP4, clip)
    amax = w.view(4, 4, 16).abs().amax(-1) * clip / 6
    assert torch.equal(mc, round_to_fp(amax / s0.float(), "fp8_e4m3")) and mc[0, 0] < m1[0, 0]


@pytest.mark.parametrize("seed", range(3))
def test_fast_fake_quant_is_the_exact_decode(seed):
    w = _w(16, 128, seed)
    w[0, :5] = 0.0
    w[1, 3] = -1e-9                                 # rounds to -0: the sign bit survives both paths
    clip = torch.rand(16, 8, generator=torch.Generator().manual_seed(seed)) * 0.3 + 0.7
    for c in (1.0, clip):
        ref = quantize_tensor(w, NVFP4, c).dequantize()
        fast = fake_quantize_fast(w, NVFP4, c)
        assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


def test_error_close_to_one_level_16bit_group_scales():
    """The e4m3 micro-scale costs little against a free bf16 scale per 16 (its 3 mantissa bits round the scale)."""
    w = _w(64, 256, 5)
    one = QuantSpec("fp4_e2m1", group_size=16, scale_dtype="bfloat16")
    two = quant_error(w, quantize_tensor(w, NVFP4).dequantize())["sqnr_db"]
    ref = quant_error(w, quantize_tensor(w, one).dequantize())["sqnr_db"]
    assert ref - 1.0 < two < ref + 0.5 and two > 15


def test_round_to_fp_float32_path_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200000, generator=g) * torch.exp2(torch.randint(-20, 12, (200000,), generator=g).float())
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 2.5, 0.25, 5.0, 1e30])])
    for dtype in ("fp4_e2m1", "fp8_e4m3", "fp8_e5m2"):
        a, b = round_to_fp(x, dtype), round_to_fp(x.double(), dtype)
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        keep = ~torch.isnan(a)
        assert torch.equal(a[keep].view(torch.int32), b[keep].view(torch.int32))
