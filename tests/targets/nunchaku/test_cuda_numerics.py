"""The CPU emulation of dcc's W4A4 kernels (dcc/targets/nunchaku/cuda_numerics.py) against independent computations:
its exact fp32 steps (round_f32 on constructed ties, fma_f32 against exact rationals), the whole layer against a
scalar exact-rational replay of the kernel's steps (bit for bit), and its error against the exact result of the stored
codes and scales next to Nunchaku's own numerics (reference.py), on random layers and on a compiled tiny Nunchaku
artifact. The relative errors are printed (-s) and bounded."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from dcc.ir.w4a4 import quantize_act_int4
from dcc.targets.nunchaku import cuda_numerics as cn
from dcc.targets.nunchaku.reference import w4a4_int4_linear

DTYPES = (torch.float16, torch.bfloat16)
_FMT = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126)}


def rne(v: Fraction, dtype) -> Fraction:
    """Exact round-to-nearest-even of a rational to the format (no overflow in these tests)."""
    if v == 0:
        return Fraction(0)
    mbits, emin = _FMT[dtype]
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    q = Fraction(2) ** (max(e, emin) - mbits)
    r = a / q
    n = r.numerator // r.denominator
    rem = r - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    return (n * q) if v > 0 else -(n * q)


def F(v) -> Fraction:
    return Fraction(float(v))


# -------------------------------------------------------------------------------------------- the fp32 steps

def test_round_f32_ties_decided_by_the_remainder():
    one = 1.0
    half_ulp = 2.0 ** -24
    s = torch.tensor([one + half_ulp] * 3 + [one + 3 * half_ulp] * 3, dtype=torch.float64)
    err = torch.tensor([2.0 ** -70, -(2.0 ** -70), 0.0] * 2, dtype=torch.float64)
    got = cn.round_f32(s, err).tolist()
    # 1 + 2^-24 lies halfway between 1 and 1 + 2^-23 (RNE: 1); 1 + 3 * 2^-24 between 1 + 2^-23 and 1 + 2^-22 (RNE: the
    # latter, whose last bit is 0); a nonzero remainder picks the side it points to
    assert got == [1 + 2 * half_ulp, 1.0, 1.0, 1 + 4 * half_ulp, 1 + 2 * half_ulp, 1 + 4 * half_ulp]
    assert cn.round_f32(-s, -err).tolist() == [-v for v in got]


def test_fma_f32_matches_exact_rationals():
    g = torch.Generator().manual_seed(0)
    n = 4000
    a = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float()))
    b = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float()))
    c = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float()))
    # near-ties: c = -fl(a*b) + a tiny part (cancellation), and integers times odd multiples of 2^-12 plus powers of
    # two (many sums fall exactly halfway between two float32 values before the remainder is counted)
    c[:500] = -(a[:500] * b[:500]) + c[:500] * 2.0 ** -30
    a[500:1000] = torch.randint(-4096, 4096, (500,), generator=g).float()
    b[500:1000] = torch.ldexp(torch.randint(1, 2 ** 12, (500,), generator=g).float() * 2 + 1,
                              torch.tensor(-12)).float()
    c[500:1000] = torch.ldexp(torch.ones(500), torch.randint(10, 30, (500,), generator=g)).float()
    # exact ties hidden by the float64 sum: a * b = +-2^-24 (1 - 2^-36) and c = (1 + j 2^-23), both times 2^e, so
    # the float64 sum lands on a float32 midpoint and only TwoSum's remainder (-+2^-60) tells the side
    t = slice(1000, 1400)
    e = torch.exp2(torch.randint(-30, 30, (400,), generator=g).float())
    sign = torch.randint(0, 2, (400,), generator=g).float() * 2 - 1
    a[t] = (2.0 ** -24 * (1 + 2.0 ** -18)) * e * sign
    b[t] = 1 - 2.0 ** -18
    c[t] = (1 + torch.randint(0, 8, (400,), generator=g).float() * 2.0 ** -23) * e
    got = cn.fma_f32(a, b, c)
    want = [float(rne(F(x) * F(y) + F(z), torch.float32)) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert got.dtype == torch.float32
    assert got.tolist() == want
    naive = (a.double() * b.double() + c.double()).float()   # float64 sum, then float32: rounds twice
    assert int((naive != got)[t].sum()) > 50


# ------------------------------------------------------------------------------------------- the whole layer

def _layer(n, k, rank, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    wcodes = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.002).to(dtype)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(rank, k, generator=g) * 0.05).to(dtype) if rank else None
    up = (torch.randn(n, rank, generator=g) * 0.05).to(dtype) if rank else None
    b = (torch.randn(n, generator=g) * 0.5).to(dtype) if bias else None
    return wcodes, wscales, smooth, down, up, b


def _x(m, k, dtype, seed, unsigned=False):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-4, 5, (m, 1), generator=g).float())
    x[:, torch.randint(0, k, (max(1, k // 32),), generator=g)] *= 30
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    if m > 2:
        x[1] = 0
    return x.to(dtype)


def scalar_kernel(x16, wcodes, wscales, smooth, down, up, bias, unsigned, dtype) -> torch.Tensor:
    """The kernel's steps output by output in exact rationals (csrc/w4a4: quant_act.cu, gemm.cu)."""
    act = quantize_act_int4(x16, smooth, 64, unsigned, dtype)
    m, k = x16.shape
    n, groups = wcodes.shape[0], k // 64
    a, w = act.codes.tolist(), wcodes.tolist()
    asc, wsc = act.scales.float().tolist(), wscales.float().tolist()
    xs = x16.float().tolist()
    rank = 0 if down is None else down.shape[0]
    lora = [[Fraction(0)] * rank for _ in range(m)]
    if rank:
        d = down.float().tolist()
        for i in range(m):
            for r in range(rank):
                acc = Fraction(0)
                for gi in range(groups):
                    p = Fraction(0)
                    for j in range(gi * 64, gi * 64 + 64):
                        p = rne(F(xs[i][j]) * F(d[r][j]) + p, torch.float32)
                    acc = rne(acc + p, torch.float32)
                lora[i][r] = acc
    upl = up.float().tolist() if rank else None
    out = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for o in range(n):
            acc = Fraction(0)
            for gi in range(groups):
                psum = sum(a[i][kk] * w[o][kk] for kk in range(gi * 64, gi * 64 + 64))
                s = rne(F(asc[i][gi]) * F(wsc[o][gi]), torch.float32)
                acc = rne(psum * s + acc, torch.float32)
            if bias is not None:
                acc = rne(acc + F(bias[o].float()), torch.float32)
            for r in range(rank):
                acc = rne(lora[i][r] * F(upl[o][r]) + acc, torch.float32)
            out[i, o] = float(rne(acc, dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
def test_emulation_equals_scalar_replay(dtype, unsigned):
    n, k, rank, m = 6, 128, 16, 3
    wcodes, wscales, smooth, down, up, bias = _layer(n, k, rank, dtype, seed=1)
    x = _x(m, k, dtype, seed=1, unsigned=unsigned)
    got = cn.w4a4_int4_linear_cuda(x, wcodes, wscales, smooth, down, up, bias, unsigned=unsigned, dtype=dtype)
    want = scalar_kernel(x, wcodes, wscales, smooth, down, up, bias, unsigned, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.double(), want)


def test_lora_down_act_order():
    """Partials per 64-k group from +0, then summed in group order: a case where the order shows."""
    dtype = torch.float16
    x = torch.zeros(1, 128, dtype=dtype)
    down = torch.zeros(16, 128, dtype=dtype)
    x[0, 0], x[0, 1], x[0, 64] = 2048, 1, -2048     # group 0: 2048 + 1 = 2049 (exact in fp32); group 1: -2048
    down[0, 0], down[0, 1], down[0, 64] = 1, 2.0 ** -24, 1
    got = cn.lora_down_act(x, down, dtype)
    # group 0: fma(1, 2^-24, 2048) = 2048 in fp32 (the 2^-24 is lost), then + (-2048) = 0
    assert got[0, 0].item() == 0.0 and got.dtype == torch.float32 and torch.all(got[0, 1:] == 0)


# ------------------------------------------------------------------------------------------------ the errors

def _report(tag, x, wcodes, wscales, smooth, down, up, bias, unsigned, dtype) -> dict:
    args = (x, wcodes, wscales, smooth, down, up, bias)
    ours = cn.w4a4_int4_linear_cuda(*args, unsigned=unsigned, dtype=dtype)
    ours32 = cn.w4a4_int4_linear_cuda(*args, unsigned=unsigned, dtype=dtype, fp32_out=True)
    nunchaku = w4a4_int4_linear(*args, unsigned=unsigned, dtype=dtype)
    exact = cn.exact_int4_linear(*args, unsigned=unsigned, dtype=dtype)
    floor = exact.to(torch.float32).to(dtype)   # (float64 -> float32 -> 16 bits: within an ulp of the best)
    r = {"ours": cn.relative_error(ours, exact), "ours_fp32": cn.relative_error(ours32, exact),
         "nunchaku": cn.relative_error(nunchaku, exact), "rounding_floor": cn.relative_error(floor, exact),
         "equal_to_rounded_exact": float((cn.ulp_distance(ours, floor) == 0).float().mean()),
         "max_ulp_from_rounded_exact": int(cn.ulp_distance(ours, floor).max())}
    print(f"\n{tag}: " + ", ".join(f"{key} {v['max']:.2e}/{v['norm']:.2e}" if isinstance(v, dict) else f"{key} {v}"
                                   for key, v in r.items()) + "  (max / norm relative error vs exact)")
    return r


def _check(r, dtype):
    # the fp32 accumulation is far below the 16-bit output's own rounding, so the output is the correctly rounded
    # exact result but where an fp32 error of ~1e-7 of the largest terms decides a tiny output's last bit; and it is
    # far closer than Nunchaku's half2 accumulation
    assert r["ours_fp32"]["max"] < 1e-5
    assert r["equal_to_rounded_exact"] > 0.99
    assert r["ours"]["max"] <= r["rounding_floor"]["max"] + 2 * r["ours_fp32"]["max"]
    assert r["ours"]["norm"] < (3e-4 if dtype == torch.float16 else 2.5e-3)
    assert r["ours"]["max"] < r["nunchaku"]["max"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
@pytest.mark.parametrize("n,k,rank,m", ((256, 1024, 32, 48), (3072, 3072, 32, 16)))
def test_error_vs_exact_random(dtype, unsigned, n, k, rank, m):
    layer = _layer(n, k, rank, dtype, seed=7)
    x = _x(m, k, dtype, seed=7, unsigned=unsigned)
    _check(_report(f"random {n}x{k} r{rank} M={m} {dtype} unsigned={unsigned}", x, *layer, unsigned, dtype), dtype)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from tiny_lm_artifacts import compile_tiny, tiny_lm
    from dcc.runtime.artifact import load_artifact

    d = tmp_path_factory.mktemp("nunchaku_cuda_numerics")
    model, calib, _ = tiny_lm(d, hidden=128)
    return load_artifact(compile_tiny(model, calib, d / "art", "nunchaku"))


def test_error_vs_exact_tiny_artifact(tiny_artifact):
    from dcc.targets.nunchaku.cuda import layer_input, reference_layers

    layers = reference_layers(tiny_artifact)
    assert layers, "the tiny Nunchaku artifact has no W4A4 layer"
    gen = torch.Generator().manual_seed(0)
    worst = {}
    for name, (ref, _) in layers.items():
        x = layer_input(ref.in_features, 37, ref.unsigned, ref.dtype, gen)
        r = _report(name, x, ref.wcodes, ref.wscales, ref.smooth, ref.lora_down, ref.lora_up, ref.stored_bias,
                    ref.unsigned, ref.dtype)
        _check(r, ref.dtype)
        for key in ("ours", "nunchaku"):
            worst[key] = max(worst.get(key, 0.0), r[key]["max"])
    print(f"\ntiny artifact, worst layer: ours {worst['ours']:.2e}, Nunchaku's numerics {worst['nunchaku']:.2e}")


# ------------------------------------------------------------------------------ the GPU model's plumbing, on the CPU

@pytest.fixture
def emulated_kernels(monkeypatch):
    """dcc.runtime.cuda.w4a4_ops.w4a4_linear replaced by the emulation (same arguments, the device layout), so that
    the GPU model's wiring runs on the CPU."""
    from dcc.runtime.cuda import w4a4_ops

    def fake(x, wcodes, wscales, smooth=None, lora_down_t=None, lora_up=None, bias=None, *, unsigned=False):
        down = None if lora_down_t is None else lora_down_t.t()
        return cn.w4a4_int4_linear_cuda(x, wcodes, wscales, smooth, down, lora_up, bias, unsigned=unsigned,
                                        dtype=wscales.dtype)
    def fake_fp4(x, wcodes, wscales, alpha, dtype, wcscales=None, smooth=None, lora_down_t=None, lora_up=None,
                 bias=None):
        down = None if lora_down_t is None else lora_down_t.t()
        return cn.w4a4_nvfp4_linear_cuda(x, wcodes, wscales, smooth, down, lora_up, bias, wtscale=alpha,
                                         wcscales=wcscales, dtype=dtype)
    monkeypatch.setattr(w4a4_ops, "w4a4_linear", fake)
    monkeypatch.setattr(w4a4_ops, "w4a4_nvfp4_linear", fake_fp4)


def test_cuda_model_wiring_on_cpu(tiny_artifact, emulated_kernels):
    from dcc.runtime.reference import build_model
    from dcc.targets.base import get_target
    from dcc.targets.nunchaku.cuda import W4A4CudaLinear, check_layers_cuda

    target = get_target("nunchaku")
    assert target.cuda_extension == "w4a4"
    model = target.cuda_model(tiny_artifact, "cpu")
    assert sum(isinstance(m, W4A4CudaLinear) for m in model.modules()) == len(tiny_artifact.quantized_layers())
    ref = build_model(tiny_artifact)
    ids = torch.tensor([[(7 * i + 3) % 100 for i in range(24)]])
    with torch.no_grad():
        got = model(ids, use_cache=False).logits.float()
        want = ref(ids, use_cache=False).logits.float()
    rel = float((got - want).norm() / want.norm())
    print(f"\ntiny artifact logits, kernel numerics vs Nunchaku's (CPU reference): relative difference {rel:.2e}")
    # not small: 4-bit activations turn the two numerics' last-bit differences (3e-3 relative in bf16 on the first
    # layer's identical inputs) into flipped codes, each worth a quantization step, and the layers compound them
    # (measured 8.7e-2 on this random tiny model); a wiring error would give O(1)
    assert rel < 0.25
    res = check_layers_cuda(tiny_artifact, "cpu")
    assert set(res) == set(tiny_artifact.quantized_layers()) and all(v["ok"] for v in res.values())
    assert all(v["rel_err_exact"] < v["rel_err_reference"] for v in res.values())
    kernels = {}
    assert all(target.check_exact_cuda(tiny_artifact, "cpu", kernels).values()) and set(kernels) == set(res)


@pytest.fixture(scope="module")
def tiny_nvfp4_artifact(tmp_path_factory):
    from cli_util import run
    from tiny_lm_artifacts import tiny_lm
    from dcc.runtime.artifact import load_artifact

    d = tmp_path_factory.mktemp("nunchaku_nvfp4")
    model, calib, _ = tiny_lm(d, hidden=128)
    code, text = run("compile", model, "--target", "nunchaku", "--rank", "16", "--precision", "nvfp4", "--calib",
                     calib, "--calib-chunks", "2", "--calib-seq-len", "32", "-o", d / "art", "-q")
    assert code == 0, text
    return load_artifact(d / "art")


def test_nvfp4_artifact_on_the_kernels(tiny_nvfp4_artifact, emulated_kernels):
    from dcc.targets.nunchaku.cuda import W4A4CudaLinear, build_nunchaku_cuda_model, check_layers_cuda

    art = tiny_nvfp4_artifact
    cm = build_nunchaku_cuda_model(art, "cpu")
    assert sum(isinstance(m, W4A4CudaLinear) for m in cm.modules()) == len(art.quantized_layers())
    res = check_layers_cuda(art, "cpu")
    assert res and all(v["ok"] and v["kernel"] == "w4a4 nvfp4" for v in res.values())
    for name, v in res.items():
        print(f"\n{name} (NVFP4): rel err vs exact {v['rel_err_exact']:.2e}, Nunchaku's numerics "
              f"{v['rel_err_reference']:.2e}")


def test_layers_fall_back_to_the_cpu_reference(tiny_nvfp4_artifact, monkeypatch, caplog):
    """With the NVFP4 kernel switched off, every layer runs its CPU reference module (said once in the log), and
    the model's outputs are the reference model's."""
    import logging

    from dcc.runtime.reference import build_model
    from dcc.targets.nunchaku import cuda
    from dcc.targets.nunchaku.cuda import CpuReferenceLinear, W4A4CudaLinear, build_nunchaku_cuda_model

    monkeypatch.setattr(cuda, "NVFP4_KERNEL", False)
    art = tiny_nvfp4_artifact
    with caplog.at_level(logging.INFO, logger="dcc"):
        cm = build_nunchaku_cuda_model(art, "cpu")
    assert not any(isinstance(m, W4A4CudaLinear) for m in cm.modules())
    assert sum(isinstance(m, CpuReferenceLinear) for m in cm.modules()) == len(art.quantized_layers())
    assert sum("NVFP4" in r.getMessage() for r in caplog.records) == 1
    ids = torch.tensor([[(7 * i + 3) % 100 for i in range(16)]])
    with torch.no_grad():
        got, want = cm(ids, use_cache=False).logits, build_model(art)(ids, use_cache=False).logits
    assert torch.equal(got, want)
    res = cuda.check_layers_cuda(art, "cpu")
    assert res and all(v["ok"] and "NVFP4" in v["kernel"] for v in res.values())


# ---------------------------------------------------------------------------------------------------- NVFP4

def _nvfp4_layer(n, k, rank, dtype, seed):
    from dcc.ir.fp_formats import round_to_fp
    g = torch.Generator().manual_seed(seed)
    wcodes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    wscales = round_to_fp(torch.rand(n, k // 16, generator=g) * 2 + 0.01, "fp8_e4m3").to(torch.float8_e4m3fn)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(rank, k, generator=g) * 0.05).to(dtype) if rank else None
    up = (torch.randn(n, rank, generator=g) * 0.05).to(dtype) if rank else None
    bias = (torch.randn(n, generator=g) * 0.5).to(dtype)
    wcscales = (torch.rand(n, generator=g) + 0.5).to(dtype)
    return wcodes, wscales, smooth, down, up, bias, wcscales


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_emulation_equals_scalar_replay(dtype):
    from dcc.ir.fp_formats import fp_decode
    from dcc.ir.w4a4 import quantize_act_nvfp4

    n, k, rank, m = 5, 128, 16, 3
    wcodes, wscales, smooth, down, up, bias, wc = _nvfp4_layer(n, k, rank, dtype, seed=3)
    x = _x(m, k, dtype, seed=3)
    alpha = 0.3
    got = cn.w4a4_nvfp4_linear_cuda(x, wcodes, wscales, smooth, down, up, bias, wtscale=alpha, wcscales=wc,
                                    dtype=dtype)
    act = quantize_act_nvfp4(x, smooth, 16, dtype)
    av, wv = fp_decode(act.codes, "fp4_e2m1").tolist(), fp_decode(wcodes, "fp4_e2m1").tolist()
    asc, wsc = act.scales.float().tolist(), wscales.float().tolist()
    lora = cn.lora_down_act(x, down, dtype).tolist()        # checked against rationals in the INT4 replay
    a32 = F(torch.tensor(alpha, dtype=torch.float32))
    want = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for o in range(n):
            acc = Fraction(0)
            for gi in range(k // 16):
                psum = sum(F(2 * av[i][j]) * F(2 * wv[o][j]) for j in range(gi * 16, gi * 16 + 16))
                s = rne(F(asc[i][gi]) * F(wsc[o][gi]), torch.float32) / 4
                acc = rne(psum * s + acc, torch.float32)
            acc = rne(acc * a32, torch.float32)
            acc = rne(acc * F(wc[o].float()), torch.float32)
            acc = rne(acc + F(bias[o].float()), torch.float32)
            for r in range(rank):
                acc = rne(F(lora[i][r]) * F(up[o, r].float()) + acc, torch.float32)
            want[i, o] = float(rne(acc, dtype))
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_error_vs_exact_random(dtype):
    from dcc.targets.nunchaku.reference import w4a4_nvfp4_linear

    n, k, rank, m = 256, 1024, 32, 24
    wcodes, wscales, smooth, down, up, bias, wc = _nvfp4_layer(n, k, rank, dtype, seed=5)
    x = _x(m, k, dtype, seed=5)
    args = (x, wcodes, wscales, smooth, down, up, bias)
    kw = dict(wtscale=0.75, wcscales=wc, dtype=dtype)
    ours = cn.w4a4_nvfp4_linear_cuda(*args, **kw)
    ours32 = cn.w4a4_nvfp4_linear_cuda(*args, **kw, fp32_out=True)
    exact = cn.exact_nvfp4_linear(*args, **kw)
    nunchaku = w4a4_nvfp4_linear(*args, **kw)
    r = {k_: cn.relative_error(v, exact) for k_, v in (("ours", ours), ("ours_fp32", ours32), ("nunchaku", nunchaku),
                                                      ("floor", exact.to(torch.float32).to(dtype)))}
    print(f"\nNVFP4 random {n}x{k} r{rank} M={m} {dtype}: "
          + ", ".join(f"{key} {v['max']:.2e}/{v['norm']:.2e}" for key, v in r.items()))
    assert r["ours_fp32"]["max"] < 1e-5
    assert r["ours"]["max"] <= r["floor"]["max"] + 2 * r["ours_fp32"]["max"]
    assert r["ours"]["max"] <= r["nunchaku"]["max"] + 1e-6
