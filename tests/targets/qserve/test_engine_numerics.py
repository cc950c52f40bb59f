"""dcc's QServe reference against QServe's own kernels, emulated instruction by instruction (tests/qserve_engine.py,
written from qserve de6a2ec and its sm_90 SASS): given the same int8 activations, every fp16 output of the per-channel,
g128 and W8A8 epilogues is bit-identical; the per-token sum follows the quantization kernel's reduction order."""
import numpy as np
import pytest
import torch

import qserve_engine as engine
from dcc.targets.qserve import layout
from dcc.targets.qserve.reference import QServeLinear


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _activations(t: int, k: int, seed: int, exact_sums: bool) -> torch.Tensor:
    """fp16 tokens, some with a large mean (their per-channel outputs nearly cancel: psum * s1 * ascale against
    s1_szeros * asum, where float32 rounding shows). exact_sums: multiples of 1/16 below 8 in magnitude, so that every
    float32 partial sum is exact in any order (the test then isolates the epilogue); else every other token also holds
    +-1000 in two channels and small values elsewhere: the large ones cancel in the sum after the float32 partial sums have rounded the small values."""
    g = _gen(seed)
    mean = torch.tensor([0.0, 1.0, -2.0, 3.0])[torch.arange(t) % 4].unsqueeze(1)
    x = mean + torch.randn(t, k, generator=g) * torch.exp2(torch.randint(-3, 2, (t, 1), generator=g).float())
    if exact_sums:
        x = (x * 16).round().clamp(-127, 127) / 16
    else:   # small values (fp16 steps down to 2^-17) that float32 sums beside 1000 (steps of 2^-14) round
        x[1::2] = torch.randn(t // 2, k, generator=g) * 2.0 ** -6
        x[1::2, 0], x[1::2, 1] = 1000.0, -1000.0
    return x.to(torch.float16).float()


def _layer(fmt: str, n: int, k: int, seed: int):
    """(tensors as stored, the integer weight the GEMM multiplies [N, K] as int64) of a random layer."""
    g = _gen(seed)
    s1 = (0.002 + 0.02 * torch.rand(n, generator=g, dtype=torch.float64)).to(torch.float16)
    if fmt == "qserve-w8a8":
        w = torch.randint(-127, 128, (n, k), generator=g)
        return {"weight": w.to(torch.int8), "dequant_scale": s1}, w
    codes = torch.randint(0, 16, (n, k), generator=g)
    if fmt == "qserve-w4a8-per-channel":
        zf = 6.0 + 3.0 * torch.rand(n, generator=g, dtype=torch.float64)      # a free (fractional) fp16 zero
        szeros = (zf * s1.double()).to(torch.float16)
        return {"qweight": layout.pack_qweight(codes), "s1_scales": s1, "s1_szeros": szeros}, codes
    s2 = torch.randint(1, 17, (n, k // 128), generator=g)
    lo, hi = (15 - 127 // s2).clamp(min=0), (128 // s2).clamp(max=15)
    z = lo + (torch.rand(n, k // 128, generator=g) * (hi - lo + 1)).floor().long().clamp(max=hi - lo)
    w8 = (codes.reshape(n, k // 128, 128) - z.unsqueeze(-1)) * s2.unsqueeze(-1)
    return ({"qweight": layout.pack_qweight(codes), "s1_scales": s1, "s2_scales": layout.pack_s2(s2),
             "s2_zeros": layout.pack_s2(-z * s2)}, w8.reshape(n, k))


def _engine_out(fmt: str, t: dict, ints: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """QServe's fp16 output for activations x (fp16 values), every step emulated."""
    x16 = x.numpy().astype(np.float16)
    codes, scale = engine.quantize(x16)
    psum = codes @ ints.numpy().T.astype(np.int64)
    if fmt == "qserve-w4a8-per-channel":
        return engine.epilogue_per_channel(psum, t["s1_scales"].numpy(), t["s1_szeros"].numpy(), scale,
                                           engine.token_sum(x16))
    s1 = t["dequant_scale" if fmt == "qserve-w8a8" else "s1_scales"].numpy()
    return engine.epilogue_scaled(psum, s1, scale)


FORMATS = ("qserve-w4a8-per-channel", "qserve-w4a8-group", "qserve-w8a8")


def _equal_fraction(fmt: str, n: int, k: int, tokens: int, seed: int, exact_sums: bool) -> float:
    t, ints = _layer(fmt, n, k, seed)
    x = _activations(tokens, k, seed + 1, exact_sums)
    got = QServeLinear(fmt, t, n, k, None)(x).to(torch.float16).numpy()
    want = _engine_out(fmt, t, ints, x)
    return float((got.view(np.int16) == want.view(np.int16)).mean())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k,tokens", [(64, 4096, 16), (96, 1536, 24)])
def test_epilogue_bit_identical_to_qserve(fmt, n, k, tokens):
    """Same int8 activations (sums exact in any order): every output equals the engine's."""
    assert _equal_fraction(fmt, n, k, tokens, seed=n + k, exact_sums=True) == 1.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_epilogue_large_psum_rounds_to_float_first(fmt):
    """|psum| > 2^24 (K = 12288, codes 121..127, weights >= 13): I2F rounds the integer before the products."""
    n, k = 32, 12288
    t, ints = _layer(fmt, n, k, seed=5)
    g = _gen(6)
    if fmt == "qserve-w8a8":
        ints = torch.randint(100, 128, (n, k), generator=g)
        t["weight"] = ints.to(torch.int8)
    elif fmt == "qserve-w4a8-group":   # q in 13..15, z = 0, s2 = 8: w8 = 104..120
        codes = torch.randint(13, 16, (n, k), generator=g)
        s2 = torch.full((n, k // 128), 8)
        t["qweight"], t["s2_scales"], t["s2_zeros"] = layout.pack_qweight(codes), layout.pack_s2(s2), \
            layout.pack_s2(torch.zeros_like(s2))
        ints = codes * 8
    else:
        ints = torch.randint(13, 16, (n, k), generator=g)
        t["qweight"] = layout.pack_qweight(ints)
    key = "dequant_scale" if fmt == "qserve-w8a8" else "s1_scales"
    t[key] = (t[key].float() / 16).half()                 # outputs of psum * s1 * ascale stay finite in fp16
    # x in [5, 5.25] (multiples of 1/16): codes 121..127, token sums below fp16's 65504
    x = (torch.full((4, k), 5.0) + torch.rand(4, k, generator=g).mul(4).round() / 16).half().float()
    got = QServeLinear(fmt, t, n, k, None)(x).to(torch.float16).numpy()
    want = _engine_out(fmt, t, ints, x)
    assert int(ints.sum(1).min()) * 121 > 2 ** 24 and np.isfinite(want.astype(np.float32)).all()
    assert np.array_equal(got.view(np.int16), want.view(np.int16))


def test_per_token_sum_in_the_kernels_order():
    """General fp16 activations (float32 sums round): the per-channel outputs use the sum quant_kernel_fuse_sum
    computes, in its thread and lane order, for K below, at and above the 1024-thread block."""
    fmt = "qserve-w4a8-per-channel"
    for k in (512, 1024, 2560):
        assert _equal_fraction(fmt, 32, k, 8, seed=k, exact_sums=False) == 1.0, k


def test_sum_order_matters_on_these_tokens():
    """The oracle's sum is not the correctly rounded one on these inputs (so the test above can tell them apart)."""
    x = _activations(64, 2560, 7, exact_sums=False).numpy().astype(np.float16)
    engine_sum = engine.token_sum(x).view(np.int16)
    exact = x.astype(np.float64).sum(1).astype(np.float32).astype(np.float16).view(np.int16)
    torch_sum = torch.from_numpy(x).float().sum(-1).half().numpy().view(np.int16)
    assert (engine_sum != exact).any() and (engine_sum != torch_sum).any()


def test_codes_and_scale_are_the_kernels():
    """Codes cvt.rni.sat(x * fp32(rcp(amax) * 127)) and scale fp16(amax * fp32(1/127)), with the correctly rounded
    reciprocal standing in for MUFU.RCP; an all-zero token gives codes 0 and scale 0."""
    from dcc.targets.qserve.numerics import quantize_tokens

    x = _activations(32, 1024, 9, exact_sums=False)
    x[0] = 0
    a = quantize_tokens(x)
    codes, scale = engine.quantize(x.numpy().astype(np.float16))
    assert np.array_equal(a.codes.numpy().astype(np.int64), codes)
    assert np.array_equal(a.scale.reshape(-1).numpy().view(np.int16), scale.view(np.int16))
