"""GPU tests of the fused W4A4 activation kernel (csrc/w4a4/quant_act_fused.cu, quant_act's INT4 default): its codes
(int8 and e4m3 bytes), 16-bit scales, fp32 group-major scales (ascales_t, tok_pos columns) and lora_act must equal,
bit for bit, the previous kernel's (DCC_W4A4_QUANT=old, read per call) and the CPU emulation (quantize_act_int4,
cuda_numerics.lora_down_act): fp16 and bf16, signed and unsigned, with and without smoothing, ranks 0 to 256 (rank
chunks of 16, 32 and 64), M from 1 to 4096 (tail tokens of a 16-token block), K from 64 to 12288 (a last stage of
fewer groups), inf and NaN in x; the fallback to the old kernel for an unaligned x. With -s, a timing line (fused,
old, old + DCC_W4A4_LORA_DOWN=blocked) at M = 4096."""
from __future__ import annotations

import zlib

import pytest
import torch

from dcc.ir.w4a4 import quantize_act_int4
from dcc.targets.nunchaku import cuda_numerics as cn
from cuda_util import require_family
from w4a4_cases import make_x

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = (torch.float16, torch.bfloat16)
# (M, K, R): tail tokens (M % 16), one and several stages (K / 64 groups, 4 a stage; 2 for rank chunks of 64),
# rank chunks of 16 (R = 16, 48), 32 (R = 32, 96) and 64 (R = 64, 128, 256)
CASES = ((1, 64, 0), (1, 3072, 32), (7, 192, 16), (16, 64, 128), (33, 192, 48), (33, 3072, 64), (300, 192, 32),
         (300, 1024, 96), (16, 12288, 128), (7, 12288, 0), (33, 320, 256))


@pytest.fixture(scope="module")
def ops():
    from dcc.runtime.cuda import w4a4_ops
    require_family("w4a4")
    return w4a4_ops


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().cpu()
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
                  .get(t.dtype, t.dtype))


def _same(got: torch.Tensor, want: torch.Tensor, what: str, nan_equal: bool = False) -> None:
    """Bit equality (NaN = NaN of any payload where nan_equal), with the first differences on failure."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    bad = _bits(got) != _bits(want)
    if nan_equal and got.dtype.is_floating_point:
        bad &= ~(torch.isnan(got) & torch.isnan(want))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} differ; "
                    + "; ".join(f"{tuple(i)}: {got[tuple(i)].item()!r} vs {want[tuple(i)].item()!r}" for i in idx))


def _quantize(ops, monkeypatch, mode, x, smooth, down_t, unsigned, fp8=False):
    """ops.quantize with the fp32 scales, on the fused kernel (mode "fused") or the old one ("old")."""
    monkeypatch.delenv("DCC_W4A4_LORA_DOWN", raising=False)
    monkeypatch.setenv("DCC_W4A4_QUANT", mode)   # "fused" (opt-in until measured) or "old" (the default)
    out = ops.quantize(x, smooth, down_t, unsigned=unsigned, scales_t=True, fp8_codes=fp8)
    torch.cuda.synchronize()
    return out


def _check(ops, monkeypatch, x, smooth, down, unsigned, ctx, emulate=True, nan_rows=()):
    """Fused against old (every output, e4m3 codes too) and against the emulation (rows in nan_rows: lora_act only,
    see test_non_finite)."""
    dtype = x.dtype
    m = x.shape[0]
    dev = x.cuda()
    sm = None if smooth is None else smooth.cuda()
    down_t = None if down is None else down.t().contiguous().cuda()
    got = _quantize(ops, monkeypatch, "fused", dev, sm, down_t, unsigned)
    old = _quantize(ops, monkeypatch, "old", dev, sm, down_t, unsigned)
    pos = ops.tok_pos(torch.arange(m, device="cuda"))
    names = ("codes", "scales", "lora_act", "ascales_t")
    for name, g, o in zip(names, got, old):
        if name == "ascales_t":
            g, o = g[:, pos], o[:, pos]   # the padding columns are unset
        if g is None:
            assert o is None, (name, ctx)
            continue
        _same(g, o, f"fused vs old {name} {ctx}")
    codes8 = _quantize(ops, monkeypatch, "fused", dev, sm, down_t, unsigned, fp8=True)
    old8 = _quantize(ops, monkeypatch, "old", dev, sm, down_t, unsigned, fp8=True)
    _same(codes8[0], ops.codes_e4m3(got[0]), f"fused e4m3 codes {ctx}")
    _same(codes8[0], old8[0], f"fused vs old e4m3 codes {ctx}")
    _same(codes8[1], got[1], f"fused scales (fp8 run) {ctx}")
    _same(got[3][:, pos], got[1].to(torch.float32).t(), f"ascales_t = fp32 of the scales {ctx}")
    if not emulate:
        return
    keep = torch.ones(m, dtype=torch.bool)
    keep[list(nan_rows)] = False
    ref = quantize_act_int4(x[keep], smooth, 64, unsigned, dtype)
    _same(got[0].cpu()[keep], ref.codes, f"codes vs emulation {ctx}")
    _same(got[1].cpu()[keep], ref.scales.to(dtype), f"scales vs emulation {ctx}")
    if down is not None:
        where = "cuda" if m * x.shape[1] * down.shape[0] > (1 << 22) else "cpu"   # the emulation is torch ops
        want = cn.lora_down_act(x.to(where), down.to(where), dtype)
        _same(got[2], want, f"lora_act vs emulation {ctx}", nan_equal=True)


def _inputs(m, k, rank, dtype, unsigned, smoothed, *tag):
    gen = _gen("fused", m, k, rank, dtype, unsigned, smoothed, *tag)
    x = make_x(m, k, dtype, gen, unsigned)
    smooth = (torch.rand(k, generator=gen) * 8 + 0.05).to(dtype) if smoothed else None
    down = (torch.randn(rank, k, generator=gen) * 0.05).to(dtype) if rank else None
    return x, smooth, down


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
@pytest.mark.parametrize("smoothed", (False, True))
def test_fused_bit_identical(ops, monkeypatch, dtype, unsigned, smoothed):
    for m, k, rank in CASES:
        x, smooth, down = _inputs(m, k, rank, dtype, unsigned, smoothed)
        if m >= 4:   # ties of x / scale, tiny (bf16: subnormal fp32 scale) and huge values, sparse groups
            x[0, :16] = torch.tensor([7.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -7.0, 4.5, -3.5, 6.5, -5.5, 0.25, -0.75,
                                      1.0, -6.0]).to(dtype)
            x[1] = (torch.randn(k, generator=_gen(m, k)) * (1e-38 if dtype == torch.bfloat16 else 1e-6)).to(dtype)
            x[2] = (torch.randn(k, generator=_gen(k, m)) * (3e3 if dtype == torch.float16 else 1e30)).to(dtype)
        _check(ops, monkeypatch, x, smooth, down, unsigned, dict(m=m, k=k, rank=rank, dtype=dtype,
                                                                  unsigned=unsigned, smoothed=smoothed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,rank,unsigned", ((4096, 3072, 32, False), (4096, 192, 128, True),
                                               (4096, 12288, 16, False), (4096, 64, 0, True)))
def test_fused_bit_identical_large(ops, monkeypatch, dtype, m, k, rank, unsigned):
    x, smooth, down = _inputs(m, k, rank, dtype, unsigned, True)
    _check(ops, monkeypatch, x, smooth, down, unsigned, dict(m=m, k=k, rank=rank, dtype=dtype, unsigned=unsigned))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
def test_non_finite(ops, monkeypatch, dtype, unsigned):
    """inf and NaN in x: fused = old everywhere (NaN: fmaxf skips it in amax, its code is 0); the emulation agrees
    on the rows with infinities only (its amax propagates NaN: the rows with a NaN are compared on lora_act alone,
    NaN = NaN)."""
    for m, k, rank in ((7, 192, 32), (33, 3072, 16), (20, 256, 64)):
        x, smooth, down = _inputs(m, k, rank, dtype, unsigned, True, "nonfinite")
        x[0, 5] = float("inf")
        x[1, 70] = float("-inf")
        x[1, 3] = float("inf")
        x[2, :64] = float("inf")
        x[3, 9] = float("nan")
        x[4, 64:128] = float("nan")
        x[5, 0] = float("inf")
        x[5, 1] = float("-inf")   # inf - inf in the fma chain: NaN
        _check(ops, monkeypatch, x, smooth, down, unsigned, dict(m=m, k=k, rank=rank, dtype=dtype, nonfinite=True),
               nan_rows=(3, 4))


def test_unaligned_x_falls_back(ops, monkeypatch):
    """x at a 2-byte offset: quant_act runs the old kernel (the fused one needs 16-byte rows); the same bits."""
    dtype, m, k, rank = torch.bfloat16, 9, 256, 32
    x, smooth, down = _inputs(m, k, rank, dtype, False, True, "unaligned")
    buf = torch.empty(m * k + 8, dtype=dtype, device="cuda")
    xu = buf[1:1 + m * k].view(m, k)
    xu.copy_(x.cuda())
    assert xu.data_ptr() % 16
    down_t = down.t().contiguous().cuda()
    sm = smooth.cuda()
    e = ops.ext()
    codes = torch.empty(m, k, dtype=torch.int8, device="cuda")
    scales = torch.empty(m, k // 64, dtype=dtype, device="cuda")
    lora = torch.empty(m, rank, dtype=torch.float32, device="cuda")
    ws_bytes = e.quant_act_workspace(m, k, rank)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda")
    monkeypatch.setenv("DCC_W4A4_QUANT", "fused")   # asked for, but the pointer is not aligned for it
    monkeypatch.delenv("DCC_W4A4_LORA_DOWN", raising=False)
    e.quant_act(xu.data_ptr(), sm.data_ptr(), down_t.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                lora.data_ptr(), ws.data_ptr(), ws_bytes, m, k, rank, 1, 0, 0.0,
                torch.cuda.current_stream().cuda_stream, 0, 0, 0)
    torch.cuda.synchronize()
    want = _quantize(ops, monkeypatch, "fused", x.cuda(), sm, down_t, False)
    _same(codes, want[0], "codes")
    _same(scales, want[1], "scales")
    _same(lora, want[2], "lora_act")


def test_fused_timing(ops, monkeypatch):
    """Not a check: the time per call (CUDA events, 20 calls after 3) of the fused kernel, the old one and the old
    one with the blocked down-projection, bf16, M = 4096, R = 32, K = 3072 and 12288 (run with -s to see it)."""
    dtype = torch.bfloat16
    for k in (3072, 12288):
        x, smooth, down = _inputs(4096, k, 32, dtype, False, True, "timing")
        x, smooth, down_t = x.cuda(), smooth.cuda(), down.t().contiguous().cuda()
        times = {}
        for name, env in (("fused", {"DCC_W4A4_QUANT": "fused"}), ("old", {"DCC_W4A4_QUANT": "old"}),
                          ("blocked", {"DCC_W4A4_LORA_DOWN": "blocked"})):
            for var in ("DCC_W4A4_QUANT", "DCC_W4A4_LORA_DOWN"):
                monkeypatch.delenv(var, raising=False)
            for var, val in env.items():
                monkeypatch.setenv(var, val)
            for _ in range(3):
                ops.quantize(x, smooth, down_t, scales_t=True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                ops.quantize(x, smooth, down_t, scales_t=True)
            end.record()
            torch.cuda.synchronize()
            times[name] = round(start.elapsed_time(end) / 20 * 1000, 1)
        print(f"\nquant_act M=4096 K={k} R=32 bf16 on {torch.cuda.get_device_name()}: us per call {times}")
