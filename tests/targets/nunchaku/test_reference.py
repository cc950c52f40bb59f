"""The Nunchaku W4A4 CPU reference (dcc/targets/nunchaku/reference.py) against independent computations: a scalar
exact-rational emulation of the INT4 group accumulation (16-bit psum, 16-bit ascale * wscale, one rounding per fma,
groups in k order) that must match bit for bit; exact float64 sums within the worst-case bound of that half2 chain;
exact equality with one group / one NVFP4 mma; the low-rank branch fed the raw x; bias added in 16 bits before the
low-rank branch; the unsigned path as the shifted computation with its bias compensation; the fp16 output clamp; and
the nn.Linear wrapper."""
from fractions import Fraction

import pytest
import torch

from dcc.ir.formats import fp_decode
from dcc.ir.w4a4 import SHIFT_GELU, fake_quantize_act_int4, quantize_act_int4, quantize_act_nvfp4
from dcc.targets.nunchaku.reference import (NunchakuLinear, decode_int4_weight, decode_nvfp4_weight, lora_down_act,
                                            w4a4_int4_linear, w4a4_nvfp4_linear)

DTYPES = (torch.float16, torch.bfloat16)
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}   # unit roundoff (half an ulp of 1)
_FMT = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rne(v: Fraction, dtype) -> Fraction:
    """Exact round-to-nearest-even of a rational to the format (no overflow in these tests)."""
    if v == 0:
        return Fraction(0)
    mbits, emin = _FMT[dtype]
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1                                                 # now 2^e <= a < 2^(e+1)
    q = Fraction(2) ** (max(e, emin) - mbits)
    r = a / q
    n = r.numerator // r.denominator
    rem = r - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    return (n * q) if v > 0 else -(n * q)


def _fr(t: torch.Tensor) -> list:
    return [Fraction(float(v)) for v in t.reshape(-1).tolist()]


def scalar_int4(codes, scales, wcodes, wscales, dtype, bias=None) -> torch.Tensor:
    """The INT4 main branch (+ 16-bit bias), element by element in exact rationals."""
    m, k = codes.shape
    n, g = wcodes.shape[0], scales.shape[1]
    gs = k // g
    a, w = codes.tolist(), wcodes.tolist()
    asc, wsc = scales.float().tolist(), wscales.to(dtype).float().tolist()
    out = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            acc = Fraction(0)
            for gi in range(g):
                psum = sum(a[i][kk] * w[j][kk] for kk in range(gi * gs, (gi + 1) * gs))
                s = rne(Fraction(asc[i][gi]) * Fraction(wsc[j][gi]), dtype)
                acc = rne(rne(Fraction(psum), dtype) * s + acc, dtype)
            if bias is not None:
                acc = rne(acc + Fraction(float(bias[j].to(dtype))), dtype)
            out[i, j] = float(acc)
    return out


def _int4_layer(n, k, dtype, seed, rank=0):
    g = _gen(seed)
    wcodes = torch.randint(-8, 8, (n, k), generator=g)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.002).to(dtype)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(rank, k, generator=g) * 0.05).to(dtype)
    up = (torch.randn(n, rank, generator=g) * 0.05).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.5).to(dtype)
    return wcodes, wscales, smooth, down, up, bias


# ---------------------------------------------------------------------------------------------- INT4 main branch

@pytest.mark.parametrize("dtype", DTYPES)
def test_one_group_is_exact(dtype):
    # K = 64: y = 16-bit(16-bit(psum) * 16-bit(ascale * wscale)); each product of two 16-bit values is exact in fp32
    wcodes, wscales, smooth, *_ = _int4_layer(8, 64, dtype, seed=0)
    x = (torch.randn(5, 64, generator=_gen(1)) * 4).to(dtype)
    y = w4a4_int4_linear(x, wcodes, wscales, smooth)
    a = quantize_act_int4(x, smooth, dtype=dtype)
    psum = (a.codes.long() @ wcodes.long().T).float()
    s16 = (a.scales.float() * wscales.float().T).to(dtype)              # [M, 1] * [1, N]
    want = (psum.to(dtype).float() * s16.float()).to(dtype)
    assert y.dtype == dtype and torch.equal(y, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_accumulation_matches_scalar_emulation(dtype):
    # psums past 2048 (fp16) / 256 (bf16) get rounded before the fma: large codes on both sides make that common
    wcodes, wscales, smooth, *_ = _int4_layer(6, 320, dtype, seed=2)
    x = (torch.randn(4, 320, generator=_gen(3)) * 2).to(dtype)
    bias = (torch.randn(6, generator=_gen(4)) * 3).to(dtype)
    y = w4a4_int4_linear(x, wcodes, wscales, smooth, bias=bias)
    a = quantize_act_int4(x, smooth, dtype=dtype)
    want = scalar_int4(a.codes, a.scales, wcodes, wscales, dtype, bias)
    assert torch.equal(y.double(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_accumulation_within_half2_bound(dtype):
    # every step rounds: the psum (1 + d1), ascale * wscale (1 + d2), the fma (1 + d3), |d| <= u, so after G groups
    # |y - exact| <= ((1 + u)^(G + 2) - 1) * sum_g |psum_g * ascale * wscale|
    k, n = 1024, 16
    wcodes, wscales, smooth, *_ = _int4_layer(n, k, dtype, seed=5)
    x = torch.randn(8, k, generator=_gen(6)).to(dtype)
    y = w4a4_int4_linear(x, wcodes, wscales, smooth).double()
    a = quantize_act_int4(x, smooth, dtype=dtype)
    G = k // 64
    terms = torch.stack([(a.codes[:, g * 64:(g + 1) * 64].double() @ wcodes[:, g * 64:(g + 1) * 64].double().T)
                         * a.scales[:, g:g + 1].double() * wscales[:, g].double().view(1, n) for g in range(G)])
    exact = terms.sum(0)
    bound = ((1 + UNIT[dtype]) ** (G + 2) - 1) * terms.abs().sum(0)
    err = (y - exact).abs()
    assert bool((err <= bound).all())
    assert float(err.max()) > 0                                            # the 16-bit accumulation is really there
    # and the same activations/weights through fake quantization in float64 agree with `exact`
    fq = fake_quantize_act_int4(x, smooth, dtype=dtype, out_dtype=torch.float64)
    assert torch.allclose(fq @ decode_int4_weight(wcodes, wscales).T, exact, rtol=1e-12, atol=1e-12)


def test_fp16_output_is_clamped_to_65504():
    # psum = 64 * 7 * 7 = 3136, ascale = fp16(1/7), wscale 1000: 3136 * 142.9 overflows fp16 to inf in the fma, and
    # EpilogueDefault's __hmin/__hmax clamp turns +-inf into +-65504
    x = torch.ones(2, 64, dtype=torch.float16)
    x[1] = -1
    y = w4a4_int4_linear(x, torch.full((3, 64), 7), torch.full((3, 1), 1000.0, dtype=torch.float16))
    assert y.tolist() == [[65504.0] * 3, [-65504.0] * 3]
    yb = w4a4_int4_linear(x.bfloat16(), torch.full((3, 64), 7), torch.full((3, 1), 1000.0, dtype=torch.bfloat16))
    assert float(yb[0, 0]) > 65504                                          # bf16 is not clamped


# --------------------------------------------------------------------------------------------- epilogue order

@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_is_a_16bit_add(dtype):
    wcodes, wscales, smooth, _, _, bias = _int4_layer(8, 128, dtype, seed=7)
    x = torch.randn(4, 128, generator=_gen(8)).to(dtype)
    y0 = w4a4_int4_linear(x, wcodes, wscales, smooth)
    yb = w4a4_int4_linear(x, wcodes, wscales, smooth, bias=bias)
    want = [[float(rne(Fraction(float(y0[i, j])) + Fraction(float(bias[j])), dtype)) for j in range(8)]
            for i in range(4)]
    assert yb.double().tolist() == want
    assert not torch.equal(yb, y0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_branch_uses_raw_x(dtype):
    # zero weight codes: the main branch is exactly 0, so y is the low-rank branch alone; with smooth 4 the raw-x and
    # the x/smooth versions differ by a factor of 4
    n, k, r = 8, 256, 32
    _, wscales, _, down, up, _ = _int4_layer(n, k, dtype, seed=9, rank=r)
    x = torch.randn(6, k, generator=_gen(10)).to(dtype)
    smooth = torch.full((k,), 4.0, dtype=dtype)
    y = w4a4_int4_linear(x, torch.zeros(n, k, dtype=torch.long), wscales, smooth, down, up).double()
    raw = x.double() @ down.double().T @ up.double().T
    rel = (y - raw).norm() / raw.norm()
    # lora_act rounded to 16 bits before the up projection, and the output rounded: a few units of roundoff
    assert float(rel) < 4 * UNIT[dtype]
    smoothed = raw / 4
    assert float((y - smoothed).norm() / smoothed.norm()) > 2.5
    # the LoRA-down activations are fp32 sums of the raw 16-bit products
    act = lora_down_act(x, down, dtype)
    assert act.dtype == torch.float32
    assert torch.allclose(act.double(), x.double() @ down.double().T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_before_lora_then_one_rounding(dtype):
    # EpilogueBias runs first (16-bit add), then LoraUp widens that to fp32, adds 16-bit(lora_act) @ up^T in fp32
    # and rounds once to 16 bits
    n, k, r = 8, 128, 16
    wcodes, wscales, smooth, down, up, bias = _int4_layer(n, k, dtype, seed=11, rank=r)
    x = torch.randn(5, k, generator=_gen(12)).to(dtype)
    y0 = w4a4_int4_linear(x, wcodes, wscales, smooth, bias=bias)          # main + bias, 16-bit
    y = w4a4_int4_linear(x, wcodes, wscales, smooth, down, up, bias)
    act16 = lora_down_act(x, down, dtype).to(dtype).double()
    exact = y0.double() + act16 @ up.double().T
    want = torch.tensor([[float(rne(Fraction(v), dtype)) for v in row] for row in exact.tolist()], dtype=torch.float64)
    # the fp32 accumulation inside the mma can move a near-tie by one 16-bit ulp; almost all are equal
    ulp = want.abs().clamp(min=2.0 ** -14) * 2 * UNIT[dtype]
    assert bool(((y.double() - want).abs() <= ulp).all())
    assert float((y.double() == want).double().mean()) > 0.95
    # lora_scales scale each 16-rank tile of lora_act before its 16-bit rounding
    y2 = w4a4_int4_linear(x, wcodes, wscales, smooth, down, up, bias, lora_scales=[0.0])
    assert torch.equal(y2, y0)


# ---------------------------------------------------------------------------------------------- unsigned path

@pytest.mark.parametrize("dtype", DTYPES)
def test_unsigned_one_group_is_exact(dtype):
    wcodes, wscales, smooth, *_ = _int4_layer(6, 64, dtype, seed=13)
    x = torch.nn.functional.gelu(torch.randn(4, 64, generator=_gen(14)) * 2, approximate="tanh").to(dtype)
    y = w4a4_int4_linear(x, wcodes, wscales, smooth, unsigned=True)
    a = quantize_act_int4(x, smooth, unsigned=True, dtype=dtype)
    assert int(a.codes.min()) >= 0 and int(a.codes.max()) > 7              # u4 codes reach past the s4 range
    psum = (a.codes.long() @ wcodes.long().T).float()
    s16 = (a.scales.float() * wscales.float().T).to(dtype)
    assert torch.equal(y, (psum.to(dtype).float() * s16.float()).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unsigned_path_is_the_shifted_computation(dtype):
    # an fc2 after GELU: the main branch sees (x + shift) / smooth as u4 codes against the stored weight W*smooth,
    # the low-rank branch the unshifted x; the stored bias b - shift * rowsum(W_main / smooth) cancels the shift
    n, k, r = 16, 256, 16
    wcodes, wscales, smooth, down, up, b = _int4_layer(n, k, dtype, seed=15, rank=r)
    x = torch.nn.functional.gelu(torch.randn(8, k, generator=_gen(16)) * 2, approximate="tanh").to(dtype)
    w_main = decode_int4_weight(wcodes, wscales) / smooth.double()          # in x's domain
    stored_bias = (b.double() - SHIFT_GELU * w_main.sum(1)).to(torch.float32).to(dtype)
    y = w4a4_int4_linear(x, wcodes, wscales, smooth, down, up, stored_bias, unsigned=True).double()
    # the same thing written out: quantized shifted input @ stored weight + lora(raw x) + stored bias
    fq = fake_quantize_act_int4(x, smooth, unsigned=True, dtype=dtype, out_dtype=torch.float64)
    shifted = fq @ decode_int4_weight(wcodes, wscales).T + x.double() @ down.double().T @ up.double().T \
        + stored_bias.double()
    G = k // 64
    scale = (fq.abs() @ decode_int4_weight(wcodes, wscales).abs().T + stored_bias.double().abs()
             + (x.double() @ down.double().T).abs() @ up.double().abs().T)
    assert bool(((y - shifted).abs() <= ((1 + UNIT[dtype]) ** (G + 6) - 1) * scale + 1e-6).all())
    # and it approximates the unquantized layer x @ W^T + b (W = W_main + up @ down) to quantization accuracy
    full = x.double() @ (w_main + up.double() @ down.double()).T + b.double()
    assert float((y - full).norm() / full.norm()) < 0.08
    # without the compensation the output is off by shift * rowsum
    y_raw = w4a4_int4_linear(x, wcodes, wscales, smooth, down, up, b, unsigned=True).double()
    assert float((y_raw - full).norm() / full.norm()) > 3 * float((y - full).norm() / full.norm())


# ------------------------------------------------------------------------------------------------------ NVFP4

def _nvfp4_layer(n, k, seed):
    g = _gen(seed)
    wcodes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 16, generator=g) * 2 + 0.05).to(torch.float8_e4m3fn)
    return wcodes, wscales


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_one_mma_is_exact(dtype):
    # K = 64: one mma, whose exact sum rounds to fp32, then * alpha in fp32, then one rounding to 16 bits
    wcodes, wscales = _nvfp4_layer(8, 64, seed=17)
    x = (torch.randn(5, 64, generator=_gen(18)) * 3).to(dtype)
    smooth = (torch.rand(64, generator=_gen(19)) + 0.5).to(dtype)
    alpha = 0.0371
    y = w4a4_nvfp4_linear(x, wcodes, wscales, smooth, wtscale=alpha)
    a = quantize_act_nvfp4(x, smooth, dtype=dtype)
    exact = a.dequantize().double() @ decode_nvfp4_weight(wcodes, wscales).T
    want = (exact.float() * torch.tensor(alpha, dtype=torch.float32)).to(dtype)
    assert torch.equal(y, want)
    # per-channel scales and bias: one __hfma2(acc, wcscale, bias)
    wc = (torch.rand(8, generator=_gen(20)) + 0.5).to(dtype)
    bias = torch.randn(8, generator=_gen(21)).to(dtype)
    y2 = w4a4_nvfp4_linear(x, wcodes, wscales, smooth, bias=bias, wtscale=alpha, wcscales=wc)
    want2 = [[float(rne(Fraction(float(want[i, j])) * Fraction(float(wc[j])) + Fraction(float(bias[j])), dtype))
              for j in range(8)] for i in range(5)]
    assert y2.double().tolist() == want2


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_fp32_accumulation(dtype):
    k, n = 512, 12
    wcodes, wscales = _nvfp4_layer(n, k, seed=22)
    x = torch.randn(6, k, generator=_gen(23)).to(dtype)
    y = w4a4_nvfp4_linear(x, wcodes, wscales).double()
    a = quantize_act_nvfp4(x, dtype=dtype)
    prods = a.dequantize().double().unsqueeze(1) * decode_nvfp4_weight(wcodes, wscales).unsqueeze(0)
    exact = prods.sum(-1)
    # fp32 rounding per mma (k / 64 of them) is far below the final 16-bit rounding
    bound = UNIT[dtype] * exact.abs() + (k // 64 + 1) * 2.0 ** -24 * prods.abs().sum(-1)
    assert bool(((y - exact).abs() <= bound).all())


# ----------------------------------------------------------------------------------------------------- module

@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_module_wraps_the_reference(precision):
    dtype = torch.bfloat16
    n, k, r = 16, 128, 16
    _, _, smooth, down, up, bias = _int4_layer(n, k, dtype, seed=24, rank=r)
    if precision == "int4":
        wcodes, wscales = _int4_layer(n, k, dtype, seed=25)[:2]
        kw, fn = {}, w4a4_int4_linear
    else:
        wcodes, wscales = _nvfp4_layer(n, k, seed=25)
        kw, fn = {"wtscale": 0.02}, w4a4_nvfp4_linear
    mod = NunchakuLinear(precision, wcodes, wscales, smooth, down, up, bias, dtype=dtype, **kw)
    assert isinstance(mod, torch.nn.Linear) and mod.weight.shape == (n, k) and mod.bias.shape == (n,)
    x = torch.randn(2, 3, k, generator=_gen(26))
    y = mod(x)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    assert torch.equal(y, fn(x, wcodes, wscales, smooth, down, up, bias, dtype=dtype, **kw).float())
    dense = torch.nn.functional.linear(x, mod.weight, mod.bias)
    assert float((y - dense).norm() / dense.norm()) < 0.15                 # quantization error only


def test_module_unsigned_bias_holds_the_shift():
    dtype = torch.float16
    wcodes, wscales, smooth, down, up, bias = _int4_layer(8, 128, dtype, seed=27, rank=16)
    mod = NunchakuLinear("int4", wcodes, wscales, smooth, down, up, bias, unsigned=True, dtype=dtype)
    main = decode_int4_weight(wcodes, wscales) / smooth.double()
    assert torch.allclose(mod.bias.double(), bias.double() + SHIFT_GELU * main.sum(1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        NunchakuLinear("nvfp4", *_nvfp4_layer(8, 128, seed=1), unsigned=True)


def test_shape_and_code_checks():
    x = torch.randn(2, 128)
    with pytest.raises(ValueError):
        w4a4_int4_linear(x, torch.full((4, 128), 8), torch.ones(4, 2))     # 8 is not an s4 code
    with pytest.raises(ValueError):
        w4a4_int4_linear(x, torch.zeros(4, 128, dtype=torch.long), torch.ones(4, 3))
    with pytest.raises(ValueError):
        w4a4_int4_linear(x, torch.zeros(4, 128, dtype=torch.long), torch.ones(4, 2), lora_down=torch.ones(16, 128))
    assert fp_decode(torch.tensor([7, 15]), "fp4_e2m1").tolist() == [6.0, -6.0]
