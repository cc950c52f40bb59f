"""Nunchaku's W4A4 activation quantization (dcc/ir/w4a4.py) against its kernel rules written out again here: the INT4
scale is 16-bit(amax * fp32(1/7)), shown equal to 16-bit(amax / 7) for every 16-bit amax; codes come from the fp32
scale through round-half-even and a saturating s4/u4 pack; the division by smooth rounds to 16 bits before the amax;
the unsigned (post-GELU) path adds 0.171875 before dividing; NVFP4 micro-scales are e4m3 RNE of min(amax/6, 448) and
the codes e2m1 RNE from the fp32 scale. Hand-built cases use amax values whose fp32 scale is exactly 1 (checked), so
each code is the rounding of the value itself."""
import math

import pytest
import torch

from dcc.ir.formats import fp_decode
from dcc.ir.w4a4 import (SHIFT_GELU, add_exact, fake_quantize_act_int4, fake_quantize_act_nvfp4, fma_exact, int4_codes,
                         quantize_act_int4, quantize_act_nvfp4, rcp_approx_ftz, round_exact, shift_compensation,
                         smooth_divide, to_dtype)

DTYPES = (torch.float16, torch.bfloat16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _group(values, dtype, size=64):
    """One row: the given values, then zeros up to the group size."""
    row = torch.zeros(1, size, dtype=torch.float64)
    row[0, :len(values)] = torch.tensor(values, dtype=torch.float64)
    return row.to(dtype)


# ------------------------------------------------------------------------------------------------- primitives

def test_round_exact_rounds_once():
    x = torch.tensor([1 + 2 ** -11 + 2 ** -40], dtype=torch.float64)
    assert float(round_exact(x, torch.float16)) == 1 + 2 ** -10          # nearest, as the exact value is above the tie
    assert float(x.to(torch.float16)) == 1.0                               # torch's cast rounds twice (via float32)
    tie = torch.tensor([1 + 2 ** -11], dtype=torch.float64)
    assert float(round_exact(tie, torch.float16)) == 1.0                   # tie: even mantissa
    up = round_exact(tie, torch.float16, sticky=torch.tensor([2.0 ** -60], dtype=torch.float64))
    down = round_exact(tie + 2 ** -10, torch.float16, sticky=torch.tensor([-2.0 ** -60], dtype=torch.float64))
    assert float(up) == 1 + 2 ** -10 and float(down) == 1 + 2 ** -10
    big = torch.tensor([65519.0, 65520.0, -1e6, 2.0 ** -25, 3 * 2.0 ** -26], dtype=torch.float64)
    got = round_exact(big, torch.float16).tolist()
    assert got[:3] == [65504.0, math.inf, -math.inf]                      # 65520 ties to the even overflow
    assert got[3:] == [0.0, 2.0 ** -24]                                    # subnormal spacing 2^-24, ties to even
    assert float(round_exact(torch.tensor([1 + 2 ** -8], dtype=torch.float64), torch.bfloat16)) == 1.0


def test_fma_rounds_once():
    # (1 + 2^-10)(1 + 3 * 2^-10) - 1 = 2^-8 + 3 * 2^-20: one rounding keeps 2^-8 + 2^-18 (3 * 2^-20 is 0.75 of the
    # 2^-18 quantum), while rounding the product first (to 1 + 2^-8) would leave 2^-8
    a = torch.tensor([1 + 2 ** -10], dtype=torch.float64)
    b = torch.tensor([1 + 3 * 2 ** -10], dtype=torch.float64)
    c = torch.tensor([-1.0], dtype=torch.float64)
    assert float(fma_exact(a, b, c, torch.float16)) == 2 ** -8 + 2 ** -18
    two_step = add_exact(round_exact(a * b, torch.float16), c, torch.float16)
    assert float(two_step) == 2 ** -8


def test_rcp_flushes_subnormal_inputs():
    s = torch.tensor([2.0, 0.0, 1e-39, 2.0 ** -126, 3.0])
    r = rcp_approx_ftz(s)
    assert r[0] == 0.5 and math.isinf(r[1]) and math.isinf(r[2])         # 1e-39 is an fp32 subnormal: flushed
    assert r[3] == 2.0 ** 126 and r[4] == torch.tensor(1.0) / torch.tensor(3.0)


def test_smooth_divide_is_fp32_quotient_rounded_to_16_bits():
    x = torch.tensor([1.0, 3.0, -5.0, 7.0], dtype=torch.bfloat16)
    s = torch.tensor([3.0, 3.0, 0.75, 2.0], dtype=torch.bfloat16)
    got = smooth_divide(x, s, torch.bfloat16)
    want = (x.float() * (1.0 / s.float())).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert float(got[0]) == 0.333984375 and float(got[3]) == 3.5          # bf16(1/3), and an exact quotient


# ------------------------------------------------------------------------------------------------------- INT4

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_is_16bit_amax_over_7_for_every_16bit_amax(dtype):
    # every positive finite 16-bit value as a group's amax: the kernel's 16-bit(fp32(amax * fp32(1/7))) never differs
    # from the correctly rounded 16-bit(amax / 7)
    top = 0x7C00 if dtype == torch.float16 else 0x7F80
    amax = torch.arange(1, top, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.zeros(amax.numel(), 64, dtype=dtype)
    x[:, 5] = amax
    x[:, 9] = -amax / 2
    q = quantize_act_int4(x, dtype=dtype)
    assert q.scales.dtype == dtype and q.scales.shape == (amax.numel(), 1)
    assert torch.equal(q.scales[:, 0], (amax.double() / 7).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scales_and_codes_of_random_rows(dtype):
    x = (torch.randn(6, 256, generator=_gen(0)) * torch.tensor([1e-3, 0.1, 1, 10, 300, 5000]).view(6, 1)).to(dtype)
    q = quantize_act_int4(x, dtype=dtype)
    g = x.float().view(6, 4, 64)
    amax = g.abs().amax(-1)
    assert torch.equal(q.scales, (amax.double() / 7).to(dtype))
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    # codes are the nearest integers to x * 7 / amax (the fp32 scale's reciprocal is within an ulp of 7 / amax)
    ratio = g * 7 / amax.unsqueeze(-1)
    assert float((q.codes.float().view(6, 4, 64) - ratio).abs().max()) <= 0.5 + 1e-5
    assert int(q.codes.abs().max()) == 7                                    # the amax element maps to +-7
    u = quantize_act_int4(x, unsigned=True, dtype=dtype)
    assert int(u.codes.min()) >= 0 and int(u.codes.max()) == 15


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_half_even_by_hand(dtype):
    # amax 7: fp32(7 * fp32(1/7)) = 1 exactly (1/7 rounds up by 4.5e-8 and 7 times that is under half an ulp of 1),
    # so rscale = 1 and each code is round-half-even of the value itself
    assert float(torch.tensor(7.0) * (torch.tensor(1.0) / torch.tensor(7.0))) == 1.0
    vals = [7, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 4.5, 6.5, -6.5, 0.25, -7, 5.5, 1.0]
    want = [7, 0, 2, 2, 0, -2, -2, 4, -4, 4, 6, -6, 0, -7, 6, 1]
    q = quantize_act_int4(_group(vals, dtype), dtype=dtype)
    assert float(q.scales) == 1.0
    assert q.codes[0, :16].tolist() == want and not q.codes[0, 16:].any()


def test_unsigned_round_half_even_by_hand():
    # fp16 holds v - 11/64 exactly for these v, so x + SHIFT_GELU = v; amax 15 gives fp32 scale exactly 1
    assert float(torch.tensor(15.0) * (torch.tensor(1.0) / torch.tensor(15.0))) == 1.0
    v = [15, 0.5, 1.5, 2.5, 14.5, 7.5, 0.171875]
    x = _group([a - SHIFT_GELU for a in v], torch.float16)
    x[0, len(v):] = -SHIFT_GELU                                            # shifted to exactly 0
    q = quantize_act_int4(x, unsigned=True, dtype=torch.float16)
    assert float(q.scales) == 1.0
    assert q.codes[0, :len(v)].tolist() == [15, 0, 2, 2, 14, 8, 0] and not q.codes[0, len(v):].any()


def test_saturating_pack_by_hand():
    v = torch.tensor([7.4, 7.5, 8.0, 100.0, -8.4, -8.5, -9.0, math.inf, -math.inf, math.nan, 2.5, -2.5])
    assert int4_codes(v).tolist() == [7, 7, 7, 7, -8, -8, -8, 7, -8, 0, 2, -2]
    u = torch.tensor([-0.4, -3.0, 15.4, 15.5, 16.0, 100.0, 0.5, 1.5, math.inf, -math.inf])
    assert int4_codes(u, unsigned=True).tolist() == [0, 0, 15, 15, 15, 15, 0, 2, 15, 0]


def test_negative_inputs_saturate_to_zero_when_unsigned():
    # values below -SHIFT_GELU stay negative after the shift and the u4 pack clamps them to 0; the amax is still
    # max |x| (the kernel's __habs), here |-2 + 0.171875| = 1.828125, so 1.171875 gets round(1.171875 * 15 /
    # 1.828125) = round(9.615) = 10, not 15
    x = _group([1.0, -0.5, -2.0], torch.float16)
    q = quantize_act_int4(x, unsigned=True, dtype=torch.float16)
    assert float(q.scales) == float(torch.tensor(1.828125 / 15, dtype=torch.float64).to(torch.float16))
    assert q.codes[0, :3].tolist() == [10, 0, 0]


def test_subnormal_fp32_scale_is_flushed_and_saturates():
    # bf16 amax 1e-38: amax / 7 is an fp32 subnormal, which rcp.approx.ftz reads as 0 -> rscale = inf, so nonzero
    # values saturate (+inf -> 7, -inf -> -8) and zeros stay 0 (0 * inf = NaN -> 0), while the stored scale is tiny
    x = _group([1e-38, -1e-38, 0.0, 5e-39], torch.bfloat16)
    q = quantize_act_int4(x, dtype=torch.bfloat16)
    assert q.codes[0, :4].tolist() == [7, -8, 0, 7]
    assert 0 < float(q.scales) < 2 ** -126


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_group(dtype):
    x = torch.randn(3, 128, generator=_gen(1)).to(dtype)
    x[1, :64] = 0
    q = quantize_act_int4(x, dtype=dtype)
    assert float(q.scales[1, 0]) == 0.0 and not q.codes[1, :64].any()
    alone = quantize_act_int4(x[1:2, 64:], dtype=dtype)                   # groups are independent
    assert torch.equal(q.codes[1:2, 64:], alone.codes) and torch.equal(q.scales[1:2, 1:], alone.scales)
    assert not fake_quantize_act_int4(x, dtype=dtype)[1, :64].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_division(dtype):
    g = _gen(2)
    x = (torch.randn(4, 128, generator=g) * 3).to(dtype)
    plain = quantize_act_int4(x, dtype=dtype)
    # a power-of-two smooth divides exactly: same codes, every scale exactly halved
    halved = quantize_act_int4(x, torch.full((128,), 2.0), dtype=dtype)
    assert torch.equal(halved.codes, plain.codes)
    assert torch.equal(halved.scales.double(), plain.scales.double() / 2)
    # a general smooth: the kernel quantizes the 16-bit quotient (the fp32 quotient is rounded before the amax)
    s = (torch.rand(128, generator=g) * 4 + 0.25).to(dtype)
    q = quantize_act_int4(x, s, dtype=dtype)
    v = (x.float() * (1.0 / s.float())).to(dtype)
    assert torch.equal(q.codes, quantize_act_int4(v, dtype=dtype).codes)
    amax = v.float().view(4, 2, 64).abs().amax(-1)
    assert torch.equal(q.scales, (amax.double() / 7).to(dtype))
    assert not torch.equal(q.codes, plain.codes)


def test_unsigned_zero_input_is_the_shift():
    # x = 0 with smooth 2: every value is 0.171875 / 2 = 0.0859375, so amax is that, the scale 16-bit(amax / 15),
    # and every code 15
    q = quantize_act_int4(torch.zeros(1, 64, dtype=torch.bfloat16), torch.full((64,), 2.0), unsigned=True)
    assert float(q.scales) == float(torch.tensor(0.0859375 / 15, dtype=torch.float64).to(torch.bfloat16))
    assert q.codes.tolist() == [[15] * 64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unsigned_path_shifts_then_divides(dtype):
    h = torch.randn(5, 192, generator=_gen(3)) * 2
    x = torch.nn.functional.gelu(h, approximate="tanh").to(dtype)       # fc2's input: min about -0.17
    s = (torch.rand(192, generator=_gen(4)) + 0.5).to(dtype)
    q = quantize_act_int4(x, s, unsigned=True, dtype=dtype)
    # written out: 16-bit add of the shift, fp32 quotient rounded to 16 bits, scale from amax / 15, codes in [0, 15]
    v = (x.float() + SHIFT_GELU).to(dtype)
    v = (v.float() * (1.0 / s.float())).to(dtype).float().view(5, 3, 64)
    scale = v.abs().amax(-1) * (torch.tensor(1.0) / torch.tensor(15.0))
    codes = torch.round(v * (1.0 / scale).unsqueeze(-1)).clamp(0, 15)
    assert torch.equal(q.codes.float().view(5, 3, 64), codes)
    assert torch.equal(q.scales, scale.to(dtype))
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) == 15
    # back in x's domain: codes * scale * smooth - shift approximates x within half a step, plus the two 16-bit
    # roundings (shift, division) of the shifted value
    back = fake_quantize_act_int4(x, s, unsigned=True, dtype=dtype, unsmooth=True, out_dtype=torch.float32)
    step = (q.scales.float().unsqueeze(-1) * s.float().view(3, 64)).reshape(5, 192)
    unit = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
    bound = step / 2 * (1 + 1e-3) + 2.5 * unit * (x.float().abs() + SHIFT_GELU)
    assert bool(((back - x.float()).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_int4(dtype):
    x = torch.randn(3, 128, generator=_gen(5)).to(dtype)
    s = (torch.rand(128, generator=_gen(6)) + 0.5).to(dtype)
    q = quantize_act_int4(x, s, dtype=dtype)
    exact = q.codes.float().view(3, 2, 64) * q.scales.float().unsqueeze(-1)
    fq = fake_quantize_act_int4(x, s, dtype=dtype, out_dtype=torch.float32)
    assert torch.equal(fq, exact.view(3, 128))                             # the smoothed domain by default
    assert fake_quantize_act_int4(x, s, dtype=dtype).dtype == dtype
    back = fake_quantize_act_int4(x, s, dtype=dtype, unsmooth=True, out_dtype=torch.float32)
    assert torch.equal(back, exact.view(3, 128) * s.float())
    rel = (back - x.float()).norm() / x.float().norm()
    assert 0 < float(rel) < 0.15


# ------------------------------------------------------------------------------------------------------ NVFP4

E2M1_CODE = {0.0: 0, 0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7}


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_codes_by_hand(dtype):
    # amax 6: fp32(6 * fp32(1/6)) = 1 exactly, so the micro-scale is 1 and each value is rounded to e2m1 itself
    assert float(torch.tensor(6.0) * (torch.tensor(1.0) / torch.tensor(6.0))) == 1.0
    vals = [6, 5, 3.5, 2.5, 1.25, 0.75, 0.25, -5, -0.25, 0.3, 2.9, -6, 4.9, 1.75, 0.5, 0]
    nearest = [6, 4, 4, 2, 1, 1, 0, -4, -0.0, 0.5, 3, -6, 4, 2, 0.5, 0]   # ties (5, 3.5, 2.5, ...) to even mantissa
    want = [E2M1_CODE[abs(v)] | (8 if math.copysign(1, v) < 0 else 0) for v in nearest]
    q = quantize_act_nvfp4(_group(vals, dtype, 16), dtype=dtype)
    assert q.scales.dtype == torch.float8_e4m3fn and float(q.scales.float()) == 1.0
    assert q.codes[0].tolist() == want
    assert fp_decode(q.codes, "fp4_e2m1")[0].tolist() == [float(v) for v in nearest]


def test_nvfp4_micro_scale_rounds_after_the_codes_are_made():
    # amax 6.375: fp32 scale 1.0625 (exact); e4m3 has 1.0 and 1.125 around it, a tie -> even -> 1.0; the code uses
    # 1/1.0625 and is 6, so the group dequantizes to 6 * 1.0 = 6, not 6.375
    q = quantize_act_nvfp4(_group([6.375, -3.1875], torch.bfloat16, 16))
    assert float(q.scales.float()) == 1.0
    assert q.codes[0, :2].tolist() == [7, 8 | 5]                            # 6, and -3.1875 / 1.0625 = -3
    assert q.dequantize()[0, :2].tolist() == [6.0, -3.0]


def test_nvfp4_scale_clamp_and_saturation():
    # fp16 amax 6000: min(6000 / 6, 448) = 448; 6000 / 448 = 13.4 saturates to 6, 1000 / 448 = 2.23 -> 2
    q = quantize_act_nvfp4(_group([6000.0, 1000.0, -6000.0], torch.float16, 16))
    assert float(q.scales.float()) == 448.0
    assert q.codes[0, :3].tolist() == [7, 4, 15]


def test_nvfp4_small_groups_lose_their_scale():
    # no per-tensor scale: amax 6 * 2^-10 gives fp32 scale 2^-10, the tie between e4m3 0 and its smallest subnormal
    # 2^-9 -> 0, so the group dequantizes to zeros; amax 6 * 2^-9 keeps scale 2^-9
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    x[0, 0], x[1, 0], x[1, 1] = 6 * 2 ** -10, 6 * 2 ** -9, -3 * 2 ** -9
    q = quantize_act_nvfp4(x)
    assert q.scales.float().view(-1).tolist() == [0.0, 2 ** -9, 0.0]
    assert not q.dequantize()[0].any() and q.codes[0, 0] == 7
    assert q.dequantize()[1, :2].tolist() == [6 * 2 ** -9, -3 * 2 ** -9]
    assert not q.codes[2].any()                                             # all-zero group: scale 0, codes 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_random_rows_and_fake_quant(dtype):
    x = (torch.randn(4, 64, generator=_gen(7)) * 3).to(dtype)
    s = (torch.rand(64, generator=_gen(8)) + 0.5).to(dtype)
    q = quantize_act_nvfp4(x, s, dtype=dtype)
    v = (x.float() * (1.0 / s.float())).to(dtype).float().view(4, 4, 16)
    scale = v.abs().amax(-1) * (torch.tensor(1.0) / torch.tensor(6.0))
    assert torch.equal(q.scales.float(), scale.to(torch.float8_e4m3fn).float())   # e4m3 RNE of the fp32 scale
    vals = fp_decode(q.codes, "fp4_e2m1").view(4, 4, 16)
    ratio = v / scale.unsqueeze(-1)
    # e2m1 spacing is 0.5 below 2, 1 up to 4, 2 up to 6: every code is within half a spacing of x / scale
    spacing = torch.where(ratio.abs() < 2, 0.5, torch.where(ratio.abs() < 4, 1.0, 2.0))
    assert bool(((vals - ratio).abs() <= spacing / 2 + 1e-6).all())
    fq = fake_quantize_act_nvfp4(x, s, dtype=dtype, out_dtype=torch.float32)
    assert torch.equal(fq, q.dequantize())
    back = fake_quantize_act_nvfp4(x, s, dtype=dtype, unsmooth=True, out_dtype=torch.float32)
    assert torch.equal(back, q.dequantize() * s.float())
    assert 0 < float((back - x.float()).norm() / x.float().norm()) < 0.2


def test_bad_arguments():
    with pytest.raises(ValueError):
        quantize_act_int4(torch.zeros(2, 100))                              # 64 does not divide 100
    with pytest.raises(ValueError):
        quantize_act_int4(torch.zeros(2, 64), dtype=torch.float32)
    with pytest.raises(ValueError):
        quantize_act_int4(torch.zeros(2, 64), torch.ones(32))


# ---------------------------------------------------------------------------------- shifted inputs, fast paths

@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_zero_quantizes_an_input_already_shifted(dtype):
    """The dcc::quant_act_int4 op's case: the graph adds the shift itself, so unsigned with shift 0 on (x + shift)
    (the same 16-bit add) gives the codes and scales of the kernel's own unsigned path on x."""
    x = torch.nn.functional.gelu(torch.randn(4, 128, generator=_gen(11)) * 2).to(dtype)
    shifted = add_exact(x, torch.full_like(x, SHIFT_GELU, dtype=torch.float64), dtype).to(dtype)
    a = quantize_act_int4(x, None, unsigned=True, dtype=dtype)
    b = quantize_act_int4(shifted, None, unsigned=True, dtype=dtype, shift=0.0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    back = fake_quantize_act_int4(shifted, None, unsigned=True, dtype=dtype, unsmooth=True, shift=0.0,
                                  out_dtype=torch.float32)
    assert torch.equal(back, b.dequantize())   # shift 0: nothing is taken off


def test_shift_compensation_by_hand():
    w = torch.tensor([[1.0, 2.0, -4.0, 0.5], [0.0, 0.0, 0.0, 8.0]])
    s = torch.tensor([1.0, 2.0, 4.0, 0.5])
    assert shift_compensation(w, s).tolist() == [SHIFT_GELU * (1 + 1 - 1 + 1), SHIFT_GELU * 16]
    assert shift_compensation(w).tolist() == [SHIFT_GELU * -0.5, SHIFT_GELU * 8]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_nvfp4_fake_quant_is_the_codes_path(dtype):
    x = torch.randn(6, 128, generator=_gen(12)) * torch.exp2(torch.randint(-12, 12, (6, 1), generator=_gen(13)))
    x[0, :16] = 0.0                               # a zero group
    x[1, :16] = 1e-5                              # a group whose e4m3 scale is 0
    x[2, 5] = 1e5                                 # beyond 6 * 448: saturates
    x[3, 7] = -1e-30                              # rounds to -0
    s = (torch.rand(128, generator=_gen(14)) + 0.5).to(dtype)
    ref = quantize_act_nvfp4(x, s, dtype=dtype).dequantize()
    fast = fake_quantize_act_nvfp4(x, s, dtype=dtype, out_dtype=torch.float32)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_dtype_from_float32_is_one_rne(dtype):
    g = _gen(15)
    x = torch.randn(100000, generator=g) * torch.exp2(torch.randint(-40, 20, (100000,), generator=g).float())
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), 1e10, 65520.0, 65519.99, 2.0 ** -25, -0.0])])
    assert torch.equal(to_dtype(x, dtype).float().view(torch.int32),
                       round_exact(x.double(), dtype).to(dtype).float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_exact_via_round_to_odd_equals_the_direct_rounding(dtype):
    from dcc.ir.w4a4 import round_by_exponent, round_exact
    g = torch.Generator().manual_seed(0)
    # values across the whole range (subnormals, overflow), exact ties of the 16-bit grid, and ties with a remainder
    mag = torch.ldexp(torch.rand(20000, generator=g, dtype=torch.float64) + 0.5,
                      torch.randint(-30 if dtype == torch.float16 else -140, 20, (20000,), generator=g))
    x = mag * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0).double()
    grid = x.to(torch.float32).to(dtype).to(torch.float64)
    nxt = torch.nextafter(grid.to(dtype), torch.full_like(grid, float("inf")).to(dtype)).to(torch.float64)
    ties = (grid + nxt) / 2
    vals = torch.cat([x, ties, ties, torch.tensor([0.0, -0.0, 65520.0, -65519.0, float("nan"), float("inf")],
                                                  dtype=torch.float64)])
    sticky = torch.cat([torch.zeros_like(x), torch.full_like(ties, 1e-300) * torch.sign(torch.randn(ties.shape[0],
                        generator=g, dtype=torch.float64)), torch.zeros_like(ties), torch.zeros(6, dtype=torch.float64)])
    fast, slow = round_exact(vals, dtype, sticky), round_by_exponent(vals, dtype, sticky)
    assert torch.equal(torch.isnan(fast), torch.isnan(slow))
    ok = ~torch.isnan(slow)
    assert torch.equal(fast[ok], slow[ok]) and torch.equal(torch.signbit(fast[ok]), torch.signbit(slow[ok]))
