"""GPU tests of the W4A4 CUDA runtime (csrc/w4a4 through dcc.runtime.cuda.w4a4_ops) for Nunchaku INT4 layers.

The activation kernel's codes and scales must be bit-identical to dcc.ir.w4a4.quantize_act_int4 (signed and unsigned,
with and without smoothing, outliers, all-zero tokens, tiny and huge values), its low-rank down-projection to
cuda_numerics.lora_down_act; the GEMM (fresh random codes, scales, low-rank activations, NaN-poisoned output) to
cuda_numerics' group accumulation and epilogue, over many shapes, ranks, with and without bias, fp16 and bf16; the
whole linear to cuda_numerics.w4a4_int4_linear_cuda; the same for NVFP4 (e2m1 codes and e4m3 micro-scales bit-equal
to quantize_act_nvfp4, gemm_nvfp4 and the NVFP4 linear to the emulation); compiled tiny Nunchaku artifacts' layers
(INT4 and NVFP4, check_layers_cuda) and the INT4 model on the GPU. The relative error of the kernels against the exact result of the stored codes and scales
is printed next to Nunchaku's own numerics (run with -s). A summary of every bit-equality check is printed at the
end and written where DCC_W4A4_TEST_REPORT points."""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

from dcc.ir.fp_formats import round_to_fp
from dcc.ir.w4a4 import quantize_act_int4, quantize_act_nvfp4
from dcc.targets.nunchaku import cuda_numerics as cn
from dcc.targets.nunchaku.reference import w4a4_int4_linear, w4a4_nvfp4_linear
from cuda_util import require_family
from w4a4_cases import make_layer, make_x

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"   # a dry run of these tests on the CPU (ops emulated by cuda_numerics) sets it to "cpu"
DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 7, 64, 300)
NKS = ((128, 128), (192, 320), (256, 1024), (1024, 256), (3072, 3072))
_STATS: list[dict] = []


@pytest.fixture(scope="module")
def ops():
    from dcc.runtime.cuda import w4a4_ops
    require_family("w4a4")
    yield w4a4_ops
    if _STATS:
        n = sum(s["n"] for s in _STATS)
        summary = {"checks": len(_STATS), "outputs": n, "bit_equal": sum(s["equal"] for s in _STATS) / max(n, 1),
                   "max_ulp": max(s["max_ulp"] for s in _STATS), "device": torch.cuda.get_device_name()}
        print("\nW4A4 summary:", json.dumps(summary))
        if os.environ.get("DCC_W4A4_TEST_REPORT"):
            with open(os.environ["DCC_W4A4_TEST_REPORT"], "w") as f:
                json.dump({"summary": summary, "checks": _STATS}, f, indent=1)


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF)


def _record(what: str, got: torch.Tensor, want: torch.Tensor, **ctx) -> None:
    """Bit-compare got with want (same dtype, on the CPU); record the result; on a difference, fail with the count
    and the first few differing positions, values and ulp distances."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if got.dtype in (torch.float16, torch.bfloat16):
        dist = cn.ulp_distance(got, want)
    elif got.dtype == torch.float32:
        v = lambda t: t.contiguous().view(torch.int32).to(torch.int64)   # noqa: E731
        dist = (torch.where(v(got) >= 0, v(got), -(v(got) & 0x7FFFFFFF))
                - torch.where(v(want) >= 0, v(want), -(v(want) & 0x7FFFFFFF))).abs()
    else:
        dist = (got.to(torch.int64) - want.to(torch.int64)).abs()
    if got.dtype.is_floating_point:   # NaN where both are NaN counts as equal
        dist = torch.where(torch.isnan(got) & torch.isnan(want), torch.zeros_like(dist), dist)
    bad = dist != 0
    rec = {"what": what, **{k: str(v) for k, v in ctx.items()}, "n": dist.numel(),
           "equal": int((~bad).sum()), "max_ulp": int(dist.max()) if dist.numel() else 0}
    _STATS.append(rec)
    if bad.any():
        idx = bad.nonzero()[:6].tolist()
        detail = "; ".join(f"{tuple(i)}: got {got[tuple(i)].item()!r} want {want[tuple(i)].item()!r} "
                           f"({int(dist[tuple(i)])} ulp)" for i in idx)
        pytest.fail(f"{what} {ctx}: {int(bad.sum())} of {dist.numel()} differ (max {rec['max_ulp']} ulp): {detail}")


def _cuda(t):
    return None if t is None else t.to(DEV)


# ---------------------------------------------------------------------------------------------- activations

def _special_rows(x: torch.Tensor, dtype) -> torch.Tensor:
    """Rows that stress the rules: ties of x / scale (amax 7 * 2^j makes rscale a power of two), tiny values (a
    bf16 group whose fp32 scale is subnormal: reciprocal flushed to inf), huge values, one nonzero value per group."""
    m, k = x.shape
    if m < 4:
        return x
    x = x.clone()
    # amax 7: scale fl32(7 * fl32(1/7)) = 1 exactly, so x * rscale = x and the halves are ties (RNE)
    tie = torch.tensor([7.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -7.0, 4.5, -3.5, 6.5, -5.5, 0.25, -0.75, 1.0, -6.0])
    x[0] = tie.repeat(k // 16).to(dtype)
    x[1] = (torch.randn(k) * (1e-38 if dtype == torch.bfloat16 else 1e-6)).to(dtype)
    x[2] = (torch.randn(k) * (3e3 if dtype == torch.float16 else 1e30)).to(dtype)
    x[3] = 0
    x[3, ::64] = torch.linspace(-5, 5, k // 64).to(dtype)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
@pytest.mark.parametrize("smoothed", (False, True))
def test_quant_act_bit_identical(ops, dtype, unsigned, smoothed):
    for m, k in ((1, 64), (7, 128), (64, 3072), (300, 1024), (5, 12288), (33, 192)):
        gen = _gen("quant", dtype, unsigned, smoothed, m, k)
        x = _special_rows(make_x(m, k, dtype, gen, unsigned), dtype)
        smooth = (torch.rand(k, generator=gen) * 8 + 0.05).to(dtype) if smoothed else None
        codes, scales, lora = ops.quantize(x.to(DEV), _cuda(smooth), unsigned=unsigned)
        ref = quantize_act_int4(x, smooth, 64, unsigned, dtype)
        ctx = dict(m=m, k=k, dtype=dtype, unsigned=unsigned, smoothed=smoothed)
        _record("activation codes", codes, ref.codes, **ctx)
        _record("activation scales", scales, ref.scales.to(dtype), **ctx)
        assert lora is None
        lo, hi = (0, 15) if unsigned else (-8, 7)
        assert int(codes.min()) >= lo and int(codes.max()) <= hi


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_act_explicit_shift(ops, dtype):
    """unsigned with shift 0 (an input already shifted), and a signed layer with a shift: the 16-bit add then
    the division, as quantize_act_int4's shift argument."""
    gen = _gen("shift", dtype)
    x = make_x(19, 256, dtype, gen, unsigned=True)
    smooth = (torch.rand(256, generator=gen) + 0.5).to(dtype)
    for unsigned, shift in ((True, 0.0), (False, 0.171875), (True, 0.5)):
        codes, scales, _ = ops.quantize(x.to(DEV), smooth.to(DEV), unsigned=unsigned, shift=shift)
        ref = quantize_act_int4(x, smooth, 64, unsigned, dtype, shift=shift)
        _record("codes (shift)", codes, ref.codes, dtype=dtype, unsigned=unsigned, shift=shift)
        _record("scales (shift)", scales, ref.scales.to(dtype), dtype=dtype, unsigned=unsigned, shift=shift)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", (16, 32, 48, 128))
def test_lora_down_bit_identical(ops, dtype, rank):
    for m, k in ((1, 64), (7, 3072), (300, 1024), (4, 12288)):
        gen = _gen("lora_down", dtype, rank, m, k)
        x = make_x(m, k, dtype, gen)
        down = (torch.randn(rank, k, generator=gen) * 0.05).to(dtype)
        _, _, lora = ops.quantize(x.to(DEV), None, down.t().contiguous().to(DEV))
        _record("lora_act", lora, cn.lora_down_act(x, down, dtype), m=m, k=k, rank=rank, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ GEMM

def _emulate_gemm(acodes, ascales, lay, lora_act, dtype, device):
    """cuda_numerics' GEMM on `device` (the GPU for large shapes: the emulation is torch ops, IEEE in float64 and
    float32 there too; test_emulation_same_on_gpu checks that)."""
    mv = lambda t: None if t is None else t.to(device)   # noqa: E731
    acc = cn.group_accumulate(mv(acodes), mv(ascales), mv(lay["wcodes"]), mv(lay["wscales"]), dtype)
    return cn.epilogue(acc, dtype, mv(lay["bias"]), mv(lora_act), mv(lay["lora_up"])).cpu()


def _gemm_case(ops, m, n, k, rank, bias, dtype, unsigned=False):
    gen = _gen("gemm", m, n, k, rank, bias, dtype, unsigned)
    lay = make_layer(n, k, rank, dtype, gen, bias)
    lo, hi = (0, 16) if unsigned else (-8, 8)
    acodes = torch.randint(lo, hi, (m, k), generator=gen).to(torch.int8)
    ascales = (torch.rand(m, k // 64, generator=gen) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen)
                                                                  .float())).to(dtype)
    if m > 2:
        ascales[m // 2] = 0                                                   # an all-zero token
    lora_act = (torch.randn(m, rank, generator=gen) * 4) if rank else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)      # every output must be written
    ops.gemm(acodes.to(DEV), ascales.to(DEV), lay["wcodes"].to(DEV), lay["wscales"].to(DEV), _cuda(lay["bias"]),
             _cuda(lora_act), _cuda(lay["lora_up"]), out=out)
    device = DEV if m * n * k > (1 << 22) else "cpu"
    want = _emulate_gemm(acodes, ascales, lay, lora_act, dtype, device)
    _record("gemm", out, want, m=m, n=n, k=k, rank=rank, bias=bias, dtype=dtype, unsigned=unsigned)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
def test_gemm_bit_identical(ops, m, n, k, dtype):
    for rank in (0, 16, 32):
        for bias in (False, True):
            if (n, k) == (3072, 3072) and (rank, bias) not in ((0, False), (32, True)):
                continue
            _gemm_case(ops, m, n, k, rank, bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_odd_shapes_and_unsigned(ops, dtype):
    """N not a multiple of the 64-channel tile, M across tile edges, unsigned activation codes, rank 48 / 64
    (two 32-rank epilogue passes)."""
    for m, n, k, rank in ((65, 200, 192, 48), (129, 72, 64, 64), (2, 8, 128, 16), (300, 136, 640, 32)):
        _gemm_case(ops, m, n, k, rank, True, dtype, unsigned=True)
        _gemm_case(ops, m, n, k, rank, False, dtype)


def test_emulation_same_on_gpu(ops):
    """The emulation run on the GPU (used above for the large shapes) gives the CPU's bits."""
    gen = _gen("emu")
    dtype = torch.bfloat16
    lay = make_layer(384, 1024, 32, dtype, gen)
    acodes = torch.randint(-8, 8, (64, 1024), generator=gen).to(torch.int8)
    ascales = torch.rand(64, 16, generator=gen).to(dtype)
    lora_act = torch.randn(64, 32, generator=gen)
    _record("emulation gpu vs cpu", _emulate_gemm(acodes, ascales, lay, lora_act, dtype, DEV),
            _emulate_gemm(acodes, ascales, lay, lora_act, dtype, "cpu"))
    x = make_x(64, 1024, dtype, gen)
    _record("lora emulation gpu vs cpu", cn.lora_down_act(x.to(DEV), lay["lora_down"].to(DEV), dtype),
            cn.lora_down_act(x, lay["lora_down"], dtype))


# ---------------------------------------------------------------------------------------------- whole linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
def test_linear_bit_identical_and_error(ops, dtype, unsigned):
    for m, n, k, rank in ((1, 3072, 3072, 32), (300, 3072, 3072, 32), (64, 12288, 3072, 32), (37, 3072, 12288, 32),
                          (7, 256, 1024, 0)):
        gen = _gen("linear", m, n, k, rank, dtype, unsigned)
        lay = make_layer(n, k, rank, dtype, gen)
        x = make_x(m, k, dtype, gen, unsigned)
        args = (lay["wcodes"], lay["wscales"], lay["smooth"], lay["lora_down"], lay["lora_up"], lay["bias"])
        got = ops.w4a4_linear(x.to(DEV), *(_cuda(a) for a in args[:3]),
                              None if rank == 0 else lay["lora_down"].t().contiguous().to(DEV),
                              _cuda(lay["lora_up"]), _cuda(lay["bias"]), unsigned=unsigned)
        dev = [_cuda(a) for a in args]
        want = cn.w4a4_int4_linear_cuda(x.to(DEV), *dev, unsigned=unsigned, dtype=dtype).cpu()
        ctx = dict(m=m, n=n, k=k, rank=rank, dtype=dtype, unsigned=unsigned)
        _record("linear", got, want, **ctx)
        exact = cn.exact_int4_linear(x.to(DEV), *dev, unsigned=unsigned, dtype=dtype).cpu()
        ours = cn.relative_error(got, exact)
        floor = cn.relative_error(exact.to(torch.float32).to(dtype), exact)
        line = f"{ctx}: ours {ours['max']:.2e} / {ours['norm']:.2e}, 16-bit rounding of exact {floor['max']:.2e}"
        if m * n * k <= (1 << 31):   # Nunchaku's numerics (CPU reference) where it is quick enough
            nun = cn.relative_error(w4a4_int4_linear(x, *args, unsigned=unsigned, dtype=dtype), exact)
            line += f", Nunchaku's numerics {nun['max']:.2e} / {nun['norm']:.2e}"
            assert ours["max"] < nun["max"], line
        print("\nrelative error vs exact (max / norm)", line)
        assert ours["max"] <= floor["max"] + 1e-5, line


def test_linear_rejects_bad_inputs(ops):
    x = torch.zeros(4, 96, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="multiples of 64"):
        ops.quantize(x)
    x = torch.zeros(4, 128, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        ops.quantize(x)
    x = torch.zeros(4, 128, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.quantize(x, None, torch.zeros(128, 8, dtype=torch.float16, device=DEV))
    codes, scales, _ = ops.quantize(x)
    with pytest.raises(ValueError, match="wscales"):
        ops.gemm(codes, scales, torch.zeros(64, 128, dtype=torch.int8, device=DEV),
                 torch.zeros(64, 2, dtype=torch.bfloat16, device=DEV))


# ------------------------------------------------------------------------------------------------- artifacts

@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from tiny_lm_artifacts import compile_tiny, tiny_lm
    from dcc.runtime.artifact import load_artifact

    d = tmp_path_factory.mktemp("nunchaku_cuda")
    model, calib, _ = tiny_lm(d, hidden=128)
    return load_artifact(compile_tiny(model, calib, d / "art", "nunchaku"))


def test_artifact_layers_bit_identical(ops, tiny_artifact):
    from dcc.targets.base import get_target
    from dcc.targets.nunchaku.cuda import check_layers_cuda

    res = check_layers_cuda(tiny_artifact, DEV)
    assert res and all(v["kernel"].startswith("w4a4 ") for v in res.values()), res   # "w4a4 int4" / "w4a4 nvfp4"
    for name, v in res.items():
        print(f"\n{name}: bit_equal {v['bit_equal']:.4f}, max {v['max_ulp']} ulp, rel err vs exact "
              f"{v['rel_err_exact']:.2e} (Nunchaku's numerics {v['rel_err_reference']:.2e})")
    assert all(v["ok"] for v in res.values()), {k: v for k, v in res.items() if not v["ok"]}
    kernels = {}
    exact = get_target("nunchaku").check_exact_cuda(tiny_artifact, DEV, kernels)
    assert all(exact.values()) and set(kernels) == set(exact)


def test_artifact_model_on_gpu(ops, tiny_artifact):
    from dcc.runtime.reference import build_model
    from dcc.targets.nunchaku.cuda import W4A4CudaLinear, build_nunchaku_cuda_model

    model = build_nunchaku_cuda_model(tiny_artifact, DEV)
    assert sum(isinstance(m, W4A4CudaLinear) for m in model.modules()) == len(tiny_artifact.quantized_layers())
    ref = build_model(tiny_artifact)
    ids = torch.tensor([[(7 * i + 3) % 100 for i in range(24)]])
    with torch.no_grad():
        got = model(ids.to(DEV), use_cache=False).logits.float().cpu()
        want = ref(ids, use_cache=False).logits.float()
    rel = float((got - want).norm() / want.norm())
    print(f"\ntiny artifact logits, GPU kernels vs CPU reference (Nunchaku's numerics): relative difference {rel:.2e}")
    # 4-bit activations amplify the numerics' last-bit differences (and the GPU's float32 attention and norms) into
    # flipped codes: about 9e-2 on this random tiny model with the emulation on the CPU (test_cuda_numerics.py); a
    # wiring error gives O(1)
    assert torch.isfinite(got).all() and rel < 0.25


# ----------------------------------------------------------------------------------------------------- NVFP4

def _special_rows_fp4(x: torch.Tensor, dtype) -> torch.Tensor:
    """amax 6 (scale fl32(6 * fl32(1/6)) = 1: the e2m1 ties 0.25, 0.75, ... 5 round to even), negative values that
    round to -0 (sign bit kept), tiny groups (e4m3 scale 0), huge groups (scale clamped to 448)."""
    m, k = x.shape
    if m < 4:
        return x
    x = x.clone()
    tie = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, -0.1, 0.0, -0.0, 4.5, -6.0])
    x[0] = tie.repeat(k // 16).to(dtype)
    x[1] = (torch.randn(k) * 1e-3).to(dtype)
    x[2] = (torch.randn(k) * (3e3 if dtype == torch.float16 else 1e5)).to(dtype)
    x[3, :k // 2] = 0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothed", (False, True))
def test_quant_act_nvfp4_bit_identical(ops, dtype, smoothed):
    for m, k in ((1, 64), (7, 128), (64, 3072), (300, 1024), (5, 12288)):
        gen = _gen("quant_fp4", dtype, smoothed, m, k)
        x = _special_rows_fp4(make_x(m, k, dtype, gen), dtype)
        smooth = (torch.rand(k, generator=gen) * 8 + 0.05).to(dtype) if smoothed else None
        down = (torch.randn(32, k, generator=gen) * 0.05).to(dtype)
        codes, scales, lora = ops.quantize_nvfp4(x.to(DEV), _cuda(smooth), down.t().contiguous().to(DEV))
        ref = quantize_act_nvfp4(x, smooth, 16, dtype)
        ctx = dict(m=m, k=k, dtype=dtype, smoothed=smoothed)
        _record("nvfp4 codes", codes, ref.codes, **ctx)
        _record("nvfp4 micro-scales", scales.view(torch.uint8), ref.scales.view(torch.uint8), **ctx)
        _record("nvfp4 lora_act", lora, cn.lora_down_act(x, down, dtype), **ctx)


def _gemm_nvfp4_case(ops, m, n, k, rank, bias, wcscales, dtype):
    gen = _gen("gemm_fp4", m, n, k, rank, bias, wcscales, dtype)
    acodes = torch.randint(0, 16, (m, k), generator=gen).to(torch.uint8)
    wcodes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    e4m3 = lambda *shape: round_to_fp(torch.rand(*shape, generator=gen) * 4, "fp8_e4m3").to(  # noqa: E731
        torch.float8_e4m3fn)
    ascales, wscales = e4m3(m, k // 16), e4m3(n, k // 16)
    alpha = float(torch.rand((), generator=gen)) + 0.1
    wc = (torch.rand(n, generator=gen) + 0.5).to(dtype) if wcscales else None
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype) if bias else None
    lora_act = (torch.randn(m, rank, generator=gen) * 4) if rank else None
    up = (torch.randn(n, rank, generator=gen) * 0.05).to(dtype) if rank else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    ops.gemm_nvfp4(acodes.to(DEV), ascales.to(DEV), wcodes.to(DEV), wscales.to(DEV), alpha, dtype, _cuda(wc),
                   _cuda(b), _cuda(lora_act), _cuda(up), out=out)
    dev = DEV if m * n * k > (1 << 22) else "cpu"
    mv = lambda t: None if t is None else t.to(dev)   # noqa: E731
    acc = cn.nvfp4_group_accumulate(acodes.to(dev), ascales.to(dev), wcodes.to(dev), wscales.to(dev))
    want = cn.epilogue(acc, dtype, mv(b), mv(lora_act), mv(up), alpha=alpha, wcscales=mv(wc)).cpu()
    _record("gemm_nvfp4", out, want, m=m, n=n, k=k, rank=rank, bias=bias, wcscales=wcscales, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", ((128, 128), (200, 320), (3072, 3072)))
@pytest.mark.parametrize("m", MS)
def test_gemm_nvfp4_bit_identical(ops, m, n, k, dtype):
    for rank, bias, wcscales in ((0, False, False), (16, True, False), (32, True, True)):
        _gemm_nvfp4_case(ops, m, n, k, rank, bias, wcscales, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_linear_bit_identical_and_error(ops, dtype):
    for m, n, k, rank in ((1, 3072, 3072, 32), (300, 3072, 3072, 32), (37, 3072, 12288, 32)):
        gen = _gen("linear_fp4", m, n, k, rank, dtype)
        wcodes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
        wscales = round_to_fp(torch.rand(n, k // 16, generator=gen) * 0.05, "fp8_e4m3").to(torch.float8_e4m3fn)
        smooth = (torch.rand(k, generator=gen) * 4 + 0.25).to(dtype)
        down = (torch.randn(rank, k, generator=gen) * 0.05).to(dtype)
        up = (torch.randn(n, rank, generator=gen) * 0.05).to(dtype)
        bias = (torch.randn(n, generator=gen) * 0.5).to(dtype)
        wc = torch.ones(n, dtype=dtype)
        x = make_x(m, k, dtype, gen)
        got = ops.w4a4_nvfp4_linear(x.to(DEV), wcodes.to(DEV), wscales.to(DEV), 0.5, dtype, wc.to(DEV),
                                    smooth.to(DEV), down.t().contiguous().to(DEV), up.to(DEV), bias.to(DEV))
        args = [t.to(DEV) for t in (x, wcodes, wscales, smooth, down, up, bias)]
        kw = dict(wtscale=0.5, wcscales=wc.to(DEV), dtype=dtype)
        want = cn.w4a4_nvfp4_linear_cuda(*args, **kw).cpu()
        ctx = dict(m=m, n=n, k=k, rank=rank, dtype=dtype)
        _record("nvfp4 linear", got, want, **ctx)
        exact = cn.exact_nvfp4_linear(*args, **kw).cpu()
        ours = cn.relative_error(got, exact)
        line = f"{ctx}: ours {ours['max']:.2e} / {ours['norm']:.2e}"
        if m * n * k <= (1 << 31):
            nun = cn.relative_error(w4a4_nvfp4_linear(x, wcodes, wscales, smooth, down, up, bias, wtscale=0.5,
                                                      wcscales=wc, dtype=dtype), exact)
            line += f", Nunchaku's numerics {nun['max']:.2e} / {nun['norm']:.2e}"
        print("\nNVFP4 relative error vs exact (max / norm)", line)


@pytest.fixture(scope="module")
def tiny_nvfp4_artifact(tmp_path_factory):
    from cli_util import run
    from tiny_lm_artifacts import tiny_lm
    from dcc.runtime.artifact import load_artifact

    d = tmp_path_factory.mktemp("nunchaku_nvfp4_cuda")
    model, calib, _ = tiny_lm(d, hidden=128)
    code, text = run("compile", model, "--target", "nunchaku", "--rank", "16", "--precision", "nvfp4", "--calib",
                     calib, "--calib-chunks", "2", "--calib-seq-len", "32", "-o", d / "art", "-q")
    assert code == 0, text
    return load_artifact(d / "art")


def test_nvfp4_artifact_layers_bit_identical(ops, tiny_nvfp4_artifact):
    from dcc.targets.nunchaku.cuda import check_layers_cuda

    res = check_layers_cuda(tiny_nvfp4_artifact, DEV)
    assert res and all(v["kernel"] == "w4a4 nvfp4" for v in res.values()), res
    assert all(v["ok"] for v in res.values()), {k: v for k, v in res.items() if not v["ok"]}


def test_cli_validate_on_gpu(ops, tiny_artifact):
    """`dcc validate ART --device cuda`: every layer's GPU output bit-equal to the emulation."""
    import re

    from cli_util import run

    code, text = run("validate", tiny_artifact.path, "--device", DEV)
    assert code == 0, text
    agree = re.search(r"GPU kernels vs CPU reference: (\d+)/(\d+) layers agree", text)
    assert agree and agree.group(1) == agree.group(2) == str(len(tiny_artifact.quantized_layers())), text
