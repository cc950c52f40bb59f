import math

import pytest
import torch

from dcc.ir.formats import (FP_DTYPES, INT_DTYPES, fake_quantize_fast, QuantizedTensor, QuantSpec, compute_qparams, dequantize,
                            fake_quantize, fp_decode, fp_encode, quant_error, quantize, quantize_tensor, round_to_fp)

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _w(n=8, k=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05 + 0.01).to(dtype)


def _bits(t):  # bit-exact comparison helper, distinguishes -0.0 from +0.0
    return t.contiguous().view({torch.float32: torch.int32, torch.float16: torch.int16,
                                torch.bfloat16: torch.int16}[t.dtype])


# ------------------------------------------------------------------------------------------------ QuantSpec

def test_spec_ranges_every_int_width():
    for b in range(2, 9):
        sym, asym = QuantSpec(f"int{b}", symmetric=True), QuantSpec(f"int{b}")
        assert sym.bits == asym.bits == b
        assert (sym.qmin, sym.qmax) == (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
        assert (asym.qmin, asym.qmax) == (0, 2 ** b - 1)
    assert (QuantSpec("int4", symmetric=True).qmin, QuantSpec("int4", symmetric=True).qmax) == (-7, 7)
    assert INT_DTYPES == {f"int{b}" for b in range(2, 9)}
    assert FP_DTYPES == {"fp8_e4m3", "fp8_e5m2", "fp4_e2m1"}
    assert QuantSpec("fp8_e4m3").bits == 8 and QuantSpec("fp4_e2m1").bits == 4


def test_fp_specs_are_symmetric():
    assert QuantSpec("fp8_e4m3").symmetric
    assert QuantSpec("fp8_e4m3") == QuantSpec("fp8_e4m3", symmetric=True)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec("int8", True, 0, "bfloat16"),
                                  QuantSpec("int3", False, 64, "float32", "scaled"), QuantSpec("fp4_e2m1", True, 32),
                                  QuantSpec("fp8_e5m2", group_size=-1)])
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert set(d) == {"dtype", "symmetric", "group_size", "scale_dtype", "zero_mode", "progressive"}
    assert QuantSpec.from_dict(d) == spec
    assert hash(QuantSpec.from_dict(dict(d))) == hash(spec)


@pytest.mark.parametrize("kwargs", [dict(dtype="int9"), dict(dtype="int1"), dict(dtype="fp8"), dict(dtype="uint4"),
                                    dict(symmetric="yes"), dict(symmetric=1), dict(group_size=-2),
                                    dict(group_size=1.5), dict(group_size=True), dict(scale_dtype="float64"),
                                    dict(scale_dtype=torch.float16), dict(zero_mode="fused")])
def test_invalid_specs_raise(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        QuantSpec.from_dict({"dtype": "int4", "bogus": 1})


def test_num_groups_and_short():
    assert QuantSpec(group_size=128).num_groups(4096) == 32
    assert QuantSpec(group_size=0).num_groups(100) == 1
    assert QuantSpec(group_size=-1).num_groups(100) == 1
    with pytest.raises(ValueError, match="100"):
        QuantSpec(group_size=128).num_groups(100)
    assert QuantSpec().short() == "uint4 asym g128 fp16"
    assert QuantSpec("int8", True, 0).short() == "int8 sym per-channel fp16"
    assert "per-tensor" in QuantSpec(group_size=-1).short()
    assert "bf16" in QuantSpec(scale_dtype="bfloat16").short()


def test_group_size_not_dividing_k_raises():
    w = _w(4, 100)
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(w, QuantSpec(group_size=64))
    with pytest.raises(ValueError):
        quantize_tensor(w, QuantSpec(group_size=64))


# --------------------------------------------------------------------------------------------- int quantize

def _in_range_bound_check(w, qt):
    """Elements whose w/s + z falls inside the code range (+-1/2) must be within s/2 after the round trip."""
    spec = qt.spec
    n, k = w.shape
    g = k if spec.group_size <= 0 else spec.group_size
    s = qt.scale.double().expand(n, -1).repeat_interleave(g, dim=1) if spec.group_size != -1 else qt.scale.double()
    z = 0.0 if qt.zero is None else (qt.zero.double().expand(n, -1).repeat_interleave(g, dim=1)
                                      if spec.group_size != -1 else qt.zero.double())
    x = w.double() / s + z
    inside = (x >= spec.qmin - 0.5) & (x <= spec.qmax + 0.5)
    assert inside.float().mean() > 0.97
    err = (qt.dequantize(torch.float64) - w.double()).abs()
    s_full = s.expand(n, k)
    assert bool((err[inside] <= s_full[inside] / 2 * (1 + 1e-6) + 1e-12).all())
    assert bool((err <= s_full * (1 + 1e-6) + 1e-12).all())  # clamped edge elements: within one step


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 0, -1])
def test_int_round_trip_every_width(bits, symmetric, group_size):
    spec = QuantSpec(f"int{bits}", symmetric, group_size)
    w = _w(6, 128, seed=bits)
    qt = quantize_tensor(w, spec)
    assert qt.codes.dtype == torch.int16 and qt.shape == w.shape
    assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    g = 1 if group_size <= 0 else 128 // group_size
    expect = (1, 1) if group_size == -1 else (6, g)
    assert tuple(qt.scale.shape) == expect and qt.scale.dtype == torch.float16
    if symmetric:
        assert qt.zero is None
    else:
        assert qt.zero.dtype == torch.int16 and tuple(qt.zero.shape) == expect
        assert int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= spec.qmax
    _in_range_bound_check(w, qt)
    # Re-quantizing the dequantized weight with the same params gives the same codes back.
    assert torch.equal(quantize(qt.dequantize(), spec, qt.scale, qt.zero), qt.codes)


def test_asym_range_includes_zero():
    spec = QuantSpec("int4", group_size=0, scale_dtype="float32")
    w = torch.tensor([[3.0, 6.0, 9.0, 18.0], [-30.0, -15.0, -6.0, -3.0]])
    s, z = compute_qparams(w, spec)
    assert torch.allclose(s, torch.tensor([[18 / 15], [30 / 15]]))
    assert z.tolist() == [[0], [15]]  # all-positive row: min 0 -> z 0; all-negative row: max 0 -> z qmax
    assert float(dequantize(torch.tensor([[0] * 4, [15] * 4], dtype=torch.int16), s, z, spec).abs().max()) == 0.0


def test_sym_int4_codes_span_minus7_to_7():
    spec = QuantSpec("int4", symmetric=True, group_size=-1)
    w = torch.linspace(-1, 1, 64).reshape(2, 32)
    qt = quantize_tensor(w, spec)
    assert int(qt.codes.min()) == -7 and int(qt.codes.max()) == 7
    assert float(qt.scale) == pytest.approx(1 / 7, rel=1e-3)


def test_round_half_to_even_sym():
    spec = QuantSpec("int4", symmetric=True, group_size=-1)
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0]])  # absmax 7 -> s = 1 exactly
    s, z = compute_qparams(w, spec)
    assert float(s) == 1.0 and z is None
    assert quantize(w, spec, s, z).tolist() == [[0, 2, 2, 0, -2, -2, 4, 7]]


def test_round_half_to_even_asym():
    spec = QuantSpec("int4", group_size=0)
    w = torch.tensor([[0.5, 1.5, 2.5, 4.5, 15.0, 0.0]])  # range [0, 15] -> s = 1, z = 0
    s, z = compute_qparams(w, spec)
    assert float(s) == 1.0 and z.tolist() == [[0]]
    assert quantize(w, spec, s, z).tolist() == [[0, 2, 2, 4, 15, 0]]
    w2 = torch.tensor([[-7.5, -6.5, 0.0, 7.5]])  # range [-7.5, 7.5] -> s = 1, z = round(7.5) = 8 (even)
    s2, z2 = compute_qparams(w2, spec)
    assert float(s2) == 1.0 and z2.tolist() == [[8]]
    assert quantize(w2, spec, s2, z2).tolist() == [[0, 2, 8, 15]]  # 0.5 -> 0, 1.5 -> 2, 15.5 clamps to 15


def test_clamping_with_clip_and_explicit_scale():
    spec = QuantSpec("int4", symmetric=True, group_size=-1)
    w = torch.tensor([[7.0, -7.0, 1.0, 3.0]])
    s, _ = compute_qparams(w, spec, clip=0.5)
    assert float(s) == 0.5
    assert quantize(w, spec, s, None).tolist() == [[7, -7, 2, 6]]
    aspec = QuantSpec("int2", group_size=-1)
    assert quantize(torch.tensor([[-5.0, 0.0, 1.0, 9.0]]), aspec, torch.ones(1, 1, dtype=torch.float16),
                    torch.ones(1, 1, dtype=torch.int16)).tolist() == [[0, 1, 2, 3]]


def test_clip_tensor_per_group():
    spec = QuantSpec("int8", symmetric=True, group_size=2, scale_dtype="float32")
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5]])
    s, _ = compute_qparams(w, spec, clip=torch.tensor([[1.0, 0.5]]))
    assert torch.allclose(s, torch.tensor([[2.0 / 127, 2.0 / 127]]))
    with pytest.raises(ValueError):
        compute_qparams(w, spec, clip=torch.ones(3, 3))
    with pytest.raises(ValueError):
        compute_qparams(w, spec, clip=0.0)


def test_scale_rounded_before_codes():
    spec = QuantSpec("int8", symmetric=True, group_size=0, scale_dtype="bfloat16")
    w = _w(4, 64)
    s, _ = compute_qparams(w, spec)
    assert s.dtype == torch.bfloat16
    codes = quantize(w, spec, s, None)
    assert torch.equal(codes, torch.round(w / s.float()).clamp(-127, 127).to(torch.int16))


def test_zero_group_gets_unit_scale():
    for spec in (QuantSpec("int4", group_size=4), QuantSpec("int4", True, 4), QuantSpec("fp8_e4m3", group_size=4)):
        w = torch.cat([torch.zeros(2, 4), torch.full((2, 4), 0.3)], dim=1)
        qt = quantize_tensor(w, spec)
        assert torch.all(qt.scale[:, 0] == 1) and torch.all(qt.scale[:, 1] != 1)
        deq = qt.dequantize()
        assert torch.equal(deq[:, :4], torch.zeros(2, 4))
        assert torch.allclose(deq[:, 4:], w[:, 4:], rtol=1e-2)


def test_underflowing_scale_becomes_smallest_subnormal():
    spec = QuantSpec("fp8_e5m2", group_size=-1)  # 1e-3 / 57344 ~ 1.7e-8 is below half of fp16's 2^-24
    w = torch.tensor([[1e-3, -5e-4, 0.0, 2e-4]])
    qt = quantize_tensor(w, spec)
    assert float(qt.scale) == 2.0 ** -24
    assert torch.allclose(qt.dequantize(), w, rtol=0.15)
    qt = quantize_tensor(torch.tensor([[1e-7, -1e-7]]), QuantSpec("int8", True, 0))
    assert float(qt.scale) == 2.0 ** -24 and qt.codes.abs().max() <= 127


def test_nonfinite_weights_raise():
    with pytest.raises(ValueError, match="non-finite"):
        compute_qparams(torch.tensor([[1.0, float("nan")]]), QuantSpec("int4", group_size=0))


def test_granularities_agree_with_reshaped_per_channel():
    w = _w(4, 128, seed=3)
    for sym in (True, False):
        grp = quantize_tensor(w, QuantSpec("int4", sym, 32))
        ref = quantize_tensor(w.reshape(16, 32), QuantSpec("int4", sym, 0))
        assert torch.equal(grp.codes.reshape(16, 32), ref.codes)
        assert torch.equal(grp.scale.reshape(16, 1), ref.scale)
        assert torch.equal(grp.dequantize().reshape(16, 32), ref.dequantize())
        ten = quantize_tensor(w, QuantSpec("int4", sym, -1))
        ref = quantize_tensor(w.reshape(1, -1), QuantSpec("int4", sym, 0))
        assert tuple(ten.scale.shape) == (1, 1)
        assert torch.equal(ten.codes.reshape(1, -1), ref.codes) and torch.equal(ten.scale, ref.scale)


def test_integer_zero_mode_decode():
    spec = QuantSpec("int4", group_size=0)
    qt = quantize_tensor(_w(3, 16), spec)
    ref = (qt.codes.float() - qt.zero.float()) * qt.scale.float()
    assert torch.equal(qt.dequantize(), ref)
    assert torch.equal(qt.dequantize(torch.float16), ref.half())


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_scaled_zero_mode_bit_exact(scale_dtype):
    sd = {"float16": torch.float16, "bfloat16": torch.bfloat16}[scale_dtype]
    spec = QuantSpec("int4", group_size=16, scale_dtype=scale_dtype, zero_mode="scaled")
    w = _w(16, 64, seed=7)
    qt = quantize_tensor(w, spec)
    got = qt.dequantize(sd)
    for i in range(16):
        for j in range(64):
            s, z, q = float(qt.scale[i, j // 16]), int(qt.zero[i, j // 16]), int(qt.codes[i, j])
            sz = float(torch.tensor(-(z * s), dtype=torch.float64).to(sd))
            ref = torch.tensor(q * s + sz, dtype=torch.float64).to(sd)  # python float: exact for these sizes
            assert _bits(got[i, j:j + 1]) == _bits(ref.reshape(1)), (i, j, q, z, s)
    assert torch.equal(qt.dequantize(torch.float32), got.float())  # float32 output: same fp16 values, widened


def test_scaled_zero_mode_all_codes_against_reference():
    spec = QuantSpec("int8", group_size=0, zero_mode="scaled")
    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(64, 1, generator=g) * 0.01 + 1e-4).half()
    zero = torch.randint(0, 256, (64, 1), generator=g, dtype=torch.int16)
    codes = torch.arange(256, dtype=torch.int16).repeat(64, 1)
    got = dequantize(codes, scale, zero, spec, torch.float16)
    sz = (-(zero.double() * scale.double())).half().double()
    ref = (codes.double() * scale.double() + sz).half()
    assert torch.equal(_bits(got), _bits(ref))
    integer = dequantize(codes, scale, zero, QuantSpec("int8", group_size=0), torch.float32)
    assert not torch.equal(got.float(), integer)  # the kernel rule really differs from (q - z) * s somewhere
    # ... but only by the two fp16 roundings (of -z*s and of the sum): at most half an ulp of each.
    bound = ((zero.double() * scale.double()).abs() + got.double().abs()) * 2.0 ** -11 + 2.0 ** -25
    assert bool(((got.double() - integer.double()).abs() <= bound).all())


def test_quantized_tensor_and_fake_quantize():
    w = _w(4, 64, dtype=torch.float16)
    spec = QuantSpec("int4", group_size=32)
    qt = quantize_tensor(w, spec)
    assert isinstance(qt, QuantizedTensor) and qt.shape == (4, 64)
    fq = fake_quantize(w, spec)
    assert fq.dtype == torch.float16
    assert torch.equal(fq, dequantize(qt.codes, qt.scale, qt.zero, spec, torch.float16))
    with pytest.raises(ValueError):
        dequantize(qt.codes, qt.scale[:, :1], qt.zero, spec)
    with pytest.raises(ValueError):
        dequantize(qt.codes, qt.scale, None, spec)


def test_quant_error():
    w = torch.tensor([[3.0, 4.0]])
    e = quant_error(w, torch.tensor([[3.0, 3.0]]))
    assert e["mse"] == pytest.approx(0.5) and e["max_abs"] == pytest.approx(1.0)
    assert e["sqnr_db"] == pytest.approx(10 * math.log10(25.0))
    assert quant_error(w, w)["sqnr_db"] == math.inf
    assert all(isinstance(v, float) for v in e.values())


# ------------------------------------------------------------------------------------------------ small floats

def _random_wide(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(n, generator=g) * 40 - 22)  # 2^-22 .. 2^18: subnormals through saturation
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def test_e4m3_matches_torch_cast_including_saturation():
    x = torch.cat([_random_wide(), torch.tensor([448.0, 464.0, 465.0, -1e9, 2.0 ** -10, -(2.0 ** -10), 0.0, -0.0,
                                                 float("inf"), float("-inf")])])
    ref = x.to(torch.float8_e4m3fn)
    assert torch.equal(_bits(round_to_fp(x, "fp8_e4m3")), _bits(ref.float()))
    assert torch.equal(fp_encode(x, "fp8_e4m3"), ref.view(torch.uint8))
    assert float(round_to_fp(torch.tensor([1e6]), "fp8_e4m3")) == 448.0


def test_e5m2_matches_torch_cast_in_range_and_saturates():
    x = _random_wide(seed=1)
    x = x[x.abs() <= 57344]
    ref = x.to(torch.float8_e5m2)
    assert torch.equal(_bits(round_to_fp(x, "fp8_e5m2")), _bits(ref.float()))
    assert torch.equal(fp_encode(x, "fp8_e5m2"), ref.view(torch.uint8))
    big = torch.tensor([61440.0, 1e9, float("inf"), -1e9])
    assert round_to_fp(big, "fp8_e5m2").tolist() == [57344.0, 57344.0, 57344.0, -57344.0]
    assert round_to_fp(torch.tensor([2.0 ** -17, 3 * 2.0 ** -17]), "fp8_e5m2").tolist() == [0.0, 2.0 ** -15]


def test_e2m1_grid_ties_and_saturation():
    grid = torch.tensor(E2M1_GRID + [-v for v in E2M1_GRID])
    assert torch.equal(round_to_fp(grid, "fp4_e2m1"), grid)
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -2.5, -5.0, 0.26, 4.9, 5.1])
    assert round_to_fp(x, "fp4_e2m1").tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -2.0, -4.0, 0.5,
                                                   4.0, 6.0]
    neg_zero = round_to_fp(torch.tensor([-0.1]), "fp4_e2m1")
    assert float(neg_zero) == 0.0 and torch.signbit(neg_zero).item()
    assert fp_encode(torch.tensor([-0.1]), "fp4_e2m1").item() == 8


def test_e2m1_codes_layout_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = fp_decode(codes, "fp4_e2m1")
    assert vals[:8].tolist() == E2M1_GRID and vals[8:].tolist() == [-v for v in E2M1_GRID]
    assert torch.equal(fp_encode(vals, "fp4_e2m1"), codes)  # includes -0 -> 8
    with pytest.raises(ValueError):
        fp_encode(torch.tensor([float("nan")]), "fp4_e2m1")
    with pytest.raises(ValueError):
        fp_decode(torch.tensor([16]), "fp4_e2m1")


def test_fp8_all_codes_round_trip():
    codes = torch.arange(256, dtype=torch.uint8)
    e4 = fp_decode(codes, "fp8_e4m3")
    ref4 = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(e4.isnan(), ref4.isnan())
    assert torch.equal(_bits(e4[~e4.isnan()]), _bits(ref4[~ref4.isnan()]))
    keep = (codes & 0x7F) != 0x7F
    assert int(keep.sum()) == 254 and not e4[keep].isnan().any()
    assert torch.equal(fp_encode(e4[keep], "fp8_e4m3"), codes[keep])
    assert float(e4[keep].abs().max()) == 448.0
    e5 = fp_decode(codes, "fp8_e5m2")
    finite = torch.isfinite(e5)
    assert int(finite.sum()) == 248
    assert torch.equal(e5[finite], codes[finite].view(torch.float8_e5m2).float())
    assert torch.equal(fp_encode(e5[finite], "fp8_e5m2"), codes[finite])


@pytest.mark.parametrize("dtype", sorted(FP_DTYPES))
@pytest.mark.parametrize("group_size", [32, 0, -1])
def test_fp_quantize_tensor(dtype, group_size):
    spec = QuantSpec(dtype, group_size=group_size)
    w = _w(4, 64, seed=5)
    qt = quantize_tensor(w, spec)
    assert qt.codes.dtype == torch.uint8 and qt.zero is None
    n_groups = 64 // group_size if group_size > 0 else 1
    s = qt.scale.float().repeat_interleave(64 // n_groups, dim=1)  # [N or 1, K]
    ref = round_to_fp(w / s, dtype) * s
    assert torch.equal(qt.dequantize(), ref)
    absmax = w.abs().amax() if group_size == -1 else None
    if absmax is not None:  # per tensor: scale maps the absmax onto the format's max (up to the fp16 rounding)
        expect = float(absmax) / spec.qmax  # e5m2 with fp16 scales lands in fp16 subnormals: absolute slack
        assert float(qt.scale) == pytest.approx(expect, rel=2.0 ** -11, abs=2.0 ** -25)
    assert quant_error(w, qt.dequantize())["sqnr_db"] > (15 if dtype == "fp4_e2m1" else 25)


def test_float_zero_grid_spans_min_to_max_and_decodes_by_one_fma():
    """zero_mode "float": the zero is a 16-bit offset (GGUF Q4_1's m, TinyChat's free scaled_zeros)."""
    g = torch.Generator().manual_seed(7)
    w = torch.rand(8, 64, generator=g) * 0.05 + 0.01          # all positive: the integer-zero grid must include 0
    spec = QuantSpec("int4", symmetric=False, group_size=32, scale_dtype="float16", zero_mode="float")
    qt = quantize_tensor(w, spec)
    assert qt.zero.dtype == torch.float16
    # the grid starts at the group minimum (rounded to fp16) and the codes use the whole range
    assert torch.equal(qt.zero, w.view(8, 2, 32).amin(-1).half())
    assert int(qt.codes.min()) == 0 and int(qt.codes.max()) == 15
    ref = (qt.codes.double().view(8, 2, 32) * qt.scale.double().unsqueeze(-1)
           + qt.zero.double().unsqueeze(-1)).half().float().view(8, 64)
    assert torch.equal(qt.dequantize(), ref)
    integer = QuantSpec("int4", symmetric=False, group_size=32, scale_dtype="float16", zero_mode="scaled")
    err = lambda s: float((fake_quantize(w, s) - w).pow(2).sum())  # noqa: E731
    assert err(spec) < err(integer)   # a range away from 0 is where the float zero pays
    assert torch.allclose(fake_quantize_fast(w, spec), qt.dequantize(), atol=2e-5)
