"""Tests of the Hopper wgmma W4A4 GEMM (csrc/w4a4/gemm_wgmma.cu through dcc.runtime.cuda.w4a4_ops): its scale layouts
on the CPU (always run), and on an sm_90 GPU its outputs (s8 and e4m3 operands) bit-identical to the CPU emulation
(dcc.targets.nunchaku.cuda_numerics) and to the mma.sync kernel on the FLUX.1 shapes, odd M, both token tiles and
both int -> float conversions, unsigned codes, ranks 0-64, fp16 and bf16, and the whole linear (activation kernel's
fp32 scales included); and the token-blocked low-rank down-projection (DCC_W4A4_LORA_DOWN=blocked). A separate
file from test_cuda_w4a4.py because that module is skipped without a GPU."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from dcc.runtime.cuda import w4a4_ops as ops_cpu
from dcc.targets.nunchaku import cuda_numerics as cn

FLUX = ((3072, 3072), (12288, 3072), (3072, 12288), (9216, 3072))
DTYPES = (torch.float16, torch.bfloat16)


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------------ CPU: layouts

def test_scales_ld_and_token_order():
    assert [ops_cpu.scales_ld(m) for m in (1, 15, 16, 17, 4096, 4097)] == [16, 16, 16, 32, 4096, 4112]
    pos = ops_cpu.tok_pos(torch.arange(64))
    assert sorted(pos.tolist()) == list(range(64)) and torch.equal(pos // 16, torch.arange(64) // 16)
    # thread t of the GEMM reads tokens 8i + 2t + e (i = 2a, 2a + 1; e = 0, 1) as one 16-byte run at 16a + 4t
    for a in range(4):
        for t in range(4):
            toks = [16 * a + 8 * b + 2 * t + e for b in (0, 1) for e in (0, 1)]
            assert pos[toks].tolist() == list(range(16 * a + 4 * t, 16 * a + 4 * t + 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_wscales_t_exact_and_group_major(dtype):
    w = (torch.rand(192, 6, generator=_gen("ws", dtype)) * 0.02 + 1e-4).to(dtype)
    t = ops_cpu.wscales_t(w)
    assert t.dtype == torch.float32 and t.shape == (6, 192) and t.is_contiguous()
    assert torch.equal(t.t().to(dtype), w) and torch.equal(t, w.to(torch.float32).t())   # exact values
    with pytest.raises(ValueError, match="16-bit"):
        ops_cpu.wscales_t(w.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ascales_t_layout(dtype):
    a = torch.rand(21, 4, generator=_gen("as", dtype)).to(dtype)
    t = ops_cpu.ascales_t(a)
    assert t.shape == (4, 32) and t.dtype == torch.float32
    pos = ops_cpu.tok_pos(torch.arange(21))
    assert torch.equal(t[:, pos], a.to(torch.float32).t())                   # exact values, permuted tokens
    rest = torch.ones(32, dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(t[:, rest], torch.zeros(4, 11))


def test_cached_wscales_t_follows_in_place_changes():
    w = torch.rand(64, 2).to(torch.bfloat16)
    first = ops_cpu.cached_wscales_t(w)
    assert ops_cpu.cached_wscales_t(w) is first
    w.mul_(2)
    again = ops_cpu.cached_wscales_t(w)
    assert again is not first and torch.equal(again, w.to(torch.float32).t())


def test_codes_e4m3_exact():
    codes = torch.arange(-8, 16, dtype=torch.int8)
    e = ops_cpu.codes_e4m3(codes)
    assert e.dtype == torch.uint8 and torch.equal(e.view(torch.float8_e4m3fn).float(), codes.float())
    assert int(e[8]) == 0 and int(e[9]) == 0x38 and int(e[23]) == 0x57 and int(e[0]) == 0xD0   # 0, 1, 15, -8
    w = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    first = ops_cpu.cached_codes_e4m3(w)
    assert ops_cpu.cached_codes_e4m3(w) is first and torch.equal(first.view(torch.float8_e4m3fn).float(), w.float())


def test_gemm_rejects_unknown_path():
    with pytest.raises(ValueError, match="path"):
        ops_cpu.gemm(None, None, None, None, path="fast")


def test_group_step_with_fp32_scales_is_the_emulation():
    """The wgmma kernel folds with the fp32 values of the 16-bit scales read group-major; the emulation with the
    scales moved through wscales_t / ascales_t and back gives the same bits (the layouts lose nothing)."""
    gen = _gen("fold")
    dtype = torch.bfloat16
    ac = torch.randint(-8, 8, (5, 256), generator=gen).to(torch.int8)
    wc = torch.randint(-8, 8, (64, 256), generator=gen).to(torch.int8)
    asc = torch.rand(5, 4, generator=gen).to(dtype)
    wsc = torch.rand(64, 4, generator=gen).to(dtype)
    want = cn.group_accumulate(ac, asc, wc, wsc, dtype)
    a2 = ops_cpu.ascales_t(asc)[:, ops_cpu.tok_pos(torch.arange(5))].t().to(dtype)
    w2 = ops_cpu.wscales_t(wsc).t().to(dtype)
    assert torch.equal(cn.group_accumulate(ac, a2, wc, w2, dtype).view(torch.int32), want.view(torch.int32))


# ------------------------------------------------------------------------------------------------ GPU: kernels

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ops():
    from cuda_util import require_family
    require_family("w4a4")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    assert ops_cpu.wgmma_supported(64, 64, 128), "sm_90 GPU but the wgmma kernel is not built (sm_90a)"
    return ops_cpu


@pytest.fixture
def knob(monkeypatch):
    """Set DCC_W4A4_WGMMA (read by the kernel's host code at every call)."""
    def set_(value: str | None):
        if value:
            monkeypatch.setenv("DCC_W4A4_WGMMA", value)
        else:
            monkeypatch.delenv("DCC_W4A4_WGMMA", raising=False)
    return set_


def _layer(m, n, k, rank, bias, dtype, unsigned, gen):
    lo, hi = (0, 16) if unsigned else (-8, 8)
    d = {"acodes": torch.randint(lo, hi, (m, k), generator=gen).to(torch.int8),
         "ascales": (torch.rand(m, k // 64, generator=gen)
                     * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen).float())).to(dtype),
         "wcodes": torch.randint(-8, 8, (n, k), generator=gen).to(torch.int8),
         "wscales": (torch.rand(n, k // 64, generator=gen) * 0.02 + 0.001).to(dtype),
         "bias": (torch.randn(n, generator=gen) * 0.5).to(dtype) if bias else None,
         "lora_act": torch.randn(m, rank, generator=gen) * 4 if rank else None,
         "lora_up": (torch.randn(n, rank, generator=gen) * 0.05).to(dtype) if rank else None}
    if m > 2:
        d["ascales"][m // 2] = 0   # an all-zero token
    return {key: None if v is None else v.cuda() for key, v in d.items()}


def _run(ops, t, path, **kw):
    m, n = t["acodes"].shape[0], t["wcodes"].shape[0]
    out = torch.full((m, n), float("nan"), dtype=t["ascales"].dtype, device="cuda")   # every output written
    return ops.gemm(t["acodes"], t["ascales"], t["wcodes"], t["wscales"], t["bias"], t["lora_act"], t["lora_up"],
                    out=out, path=path, **kw)


def _emulate(t, dtype, rows=None):
    """The emulation's outputs (of the given token rows only: outputs are independent per token, and the full
    emulation of a FLUX layer at M = 4096 takes minutes)."""
    pick = (lambda v: v) if rows is None else (lambda v: None if v is None else v[rows])   # noqa: E731
    acc = cn.group_accumulate(pick(t["acodes"]), pick(t["ascales"]), t["wcodes"], t["wscales"], dtype)
    return cn.epilogue(acc, dtype, t["bias"], pick(t["lora_act"]), t["lora_up"])


def _reference(ops, t, dtype):
    """The mma.sync kernel's outputs (bit-identical to the emulation: test_cuda_w4a4.py), checked here against the
    emulation on the first and last 24 tokens (the last token tile's edge included)."""
    m = t["acodes"].shape[0]
    ref = _run(ops, t, "mma")
    rows = torch.tensor(sorted(set(range(min(m, 24))) | set(range(max(0, m - 24), m))), device="cuda")
    _same(ref[rows], _emulate(t, dtype, rows), "mma.sync vs emulation")
    return ref


def _same(got, want, what):
    dist = cn.ulp_distance(got.cpu(), want.cpu())
    bad = int((dist != 0).sum())
    assert bad == 0, f"{what}: {bad} of {dist.numel()} outputs differ (max {int(dist.max())} ulp)"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", FLUX)
def test_wgmma_flux_shapes_bit_identical(ops, knob, n, k, dtype):
    for m, rank, bias, unsigned in ((1, 32, True, False), (37, 0, False, False), (256, 32, True, True),
                                    (300, 32, False, False)):
        t = _layer(m, n, k, rank, bias, dtype, unsigned, _gen("flux", m, n, k, rank, dtype))
        want = _reference(ops, t, dtype)
        for setting in (None, "kernel=1,tile=64", "kernel=1,tile=128,cvt=1", "kernel=2", "kernel=2,cvt=1",
                        "kernel=2,mc=1"):
            knob(setting)
            _same(_run(ops, t, "wgmma"), want, f"wgmma {setting} m={m} n={n} k={k} rank={rank} {dtype}")
            _same(_run(ops, t, "wgmma_fp8"), want, f"wgmma_fp8 {setting} m={m} n={n} k={k} rank={rank} {dtype}")
        knob(None)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1024, 4096, 4608))
def test_wgmma_large_m_bit_identical(ops, m, dtype):
    """Persistent grids with several tiles per warpgroup (128-token tiles), the benchmark's M values."""
    n, k = (3072, 3072) if m != 4608 else (3072, 12288)
    t = _layer(m, n, k, 32, True, dtype, False, _gen("large", m, dtype))
    ref = _reference(ops, t, dtype)
    _same(_run(ops, t, "auto"), ref, f"auto m={m} n={n} k={k} {dtype}")
    _same(_run(ops, t, "wgmma_fp8"), ref, f"wgmma_fp8 m={m} n={n} k={k} {dtype}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # the second kernel where its 128 x 128 tiles fill the SMs
    assert ops.ext().gemm_wgmma_kernel(m, n, 32) == (2 if (m + 127) // 128 * (n // 128) >= sms else 1)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_kernel2_edges_bit_identical(ops, knob, dtype):
    """The 128 x 128 tile kernel: M cut inside a tile, K one stage or many, ranks 0 / 32 / 64 / 128 (several epilogue
    chunks through one TMA-fed buffer), more tiles than CTAs, unsigned codes, with and without bias; CTA pairs
    multicasting the activations where N % 256 == 0 and mc=1 asks (by default each CTA loads its own)."""
    for m, n, k, rank, bias, unsigned in ((1, 128, 128, 32, True, False), (77, 256, 384, 64, False, True),
                                          (129, 384, 1024, 0, True, False), (300, 128, 256, 128, True, True),
                                          (2000, 1280, 512, 32, False, False)):
        t = _layer(m, n, k, rank, bias, dtype, unsigned, _gen("k2", m, n, k, rank, dtype))
        want = _reference(ops, t, dtype)
        for setting in ("kernel=2", "kernel=2,cvt=1", "kernel=2,mc=1"):
            knob(setting)
            assert ops.ext().gemm_wgmma_kernel(m, n, rank) == 2
            _same(_run(ops, t, "wgmma"), want, f"wgmma {setting} m={m} n={n} k={k} rank={rank}")
            _same(_run(ops, t, "wgmma_fp8"), want, f"wgmma_fp8 {setting} m={m} n={n} k={k} rank={rank}")
        knob(None)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_small_shapes_ranks_unsigned(ops, knob, dtype):
    """Token tiles cut by M, one channel tile, K = one stage, ranks over several 32-rank epilogue passes."""
    for m, n, k, rank in ((1, 64, 128, 16), (7, 128, 256, 48), (65, 192, 640, 64), (129, 64, 128, 0),
                          (300, 320, 384, 32), (2, 256, 1024, 16)):
        for unsigned in (False, True):
            t = _layer(m, n, k, rank, unsigned, dtype, unsigned, _gen("small", m, n, k, rank, unsigned, dtype))
            want = _emulate(t, dtype)
            for setting in ("kernel=1,tile=64", "kernel=1,tile=128", "kernel=1,tile=64,cvt=1", "kernel=2"):
                knob(setting)
                _same(_run(ops, t, "wgmma"), want, f"wgmma {setting} m={m} n={n} k={k} rank={rank}")
                _same(_run(ops, t, "wgmma_fp8"), want, f"wgmma_fp8 {setting} m={m} n={n} k={k} rank={rank}")


@gpu
def test_wgmma_paths_and_refusals(ops):
    t = _layer(64, 192, 320, 0, False, torch.float16, False, _gen("refuse"))
    assert not ops.wgmma_supported(64, 192, 320)                    # K % 128 != 0: mma.sync
    _same(_run(ops, t, "auto"), _emulate(t, torch.float16), "auto falls back")
    with pytest.raises(ValueError, match="wgmma"):
        _run(ops, t, "wgmma")
    assert ops.wgmma_supported(256, 3072, 3072)
    assert ops.ext().gemm_wgmma_tile(4096, 3072) == 128 and ops.ext().gemm_wgmma_tile(256, 3072) == 64


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsigned", (False, True))
def test_wgmma_linear_bit_identical(ops, dtype, unsigned):
    """quantize(scales_t=True) writes the fp32 group-major scales of its 16-bit scales; the whole linear on the
    wgmma path equals the emulation and the mma.sync path."""
    from w4a4_cases import make_layer, make_x
    for m, n, k, rank in ((1, 3072, 3072, 32), (37, 3072, 12288, 32), (300, 9216, 3072, 32), (5, 256, 1024, 0)):
        gen = _gen("linear", m, n, k, rank, dtype, unsigned)
        lay = make_layer(n, k, rank, dtype, gen)
        x = make_x(m, k, dtype, gen, unsigned).cuda()
        g = {key: None if v is None else v.cuda() for key, v in lay.items()}
        down_t = None if rank == 0 else g["lora_down"].t().contiguous()
        codes, scales, _, st = ops.quantize(x, g["smooth"], down_t, unsigned=unsigned, scales_t=True)
        pos = ops.tok_pos(torch.arange(m, device="cuda"))
        assert torch.equal(st[:, pos], ops.ascales_t(scales)[:, pos])
        codes8, scales8, _ = ops.quantize(x, g["smooth"], down_t, unsigned=unsigned, fp8_codes=True)
        assert torch.equal(codes8, ops.codes_e4m3(codes)) and torch.equal(scales8, scales)
        args = (x, g["wcodes"], g["wscales"], g["smooth"], down_t, g["lora_up"], g["bias"])
        got = ops.w4a4_linear(*args, unsigned=unsigned, path="wgmma")
        want = cn.w4a4_int4_linear_cuda(x, g["wcodes"], g["wscales"], g["smooth"], g["lora_down"], g["lora_up"],
                                        g["bias"], unsigned=unsigned, dtype=dtype)
        _same(got, want, f"linear wgmma m={m} n={n} k={k}")
        _same(ops.w4a4_linear(*args, unsigned=unsigned, path="mma"), want, f"linear mma m={m} n={n} k={k}")
        _same(ops.w4a4_linear(*args, unsigned=unsigned, path="wgmma_fp8"), want, f"linear fp8 m={m} n={n} k={k}")
        exact = cn.exact_int4_linear(x, g["wcodes"], g["wscales"], g["smooth"], g["lora_down"], g["lora_up"],
                                     g["bias"], unsigned=unsigned, dtype=dtype)
        err = cn.relative_error(got, exact)["max"]
        floor = cn.relative_error(exact.to(torch.float32).to(dtype), exact)["max"]
        err_tc = cn.relative_error(ops.w4a4_linear(*args, unsigned=unsigned, path="wgmma_tc"), exact)["max"]
        print(f"\nwgmma linear m={m} n={n} k={k} {dtype}: rel err vs exact {err:.2e}, wgmma_tc {err_tc:.2e} "
              f"(16-bit floor {floor:.2e})")
        assert err <= floor + 1e-5 and err_tc <= floor + 1e-5


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_down_blocked_bit_identical(ops, monkeypatch, dtype):
    """DCC_W4A4_LORA_DOWN=blocked (csrc/w4a4/lora_down.cu): the same codes, scales and lora_act as quant_act's own
    down-projection and the emulation; rank chunks of 32 (48, 128), token blocks cut by M."""
    from w4a4_cases import make_x
    for m, k, rank in ((1, 64, 16), (37, 3072, 32), (300, 1024, 48), (4, 12288, 128), (65, 3072, 32)):
        gen = _gen("lora_blocked", m, k, rank, dtype)
        x = make_x(m, k, dtype, gen).cuda()
        down = (torch.randn(rank, k, generator=gen) * 0.05).to(dtype).cuda()
        down_t = down.t().contiguous()
        monkeypatch.delenv("DCC_W4A4_LORA_DOWN", raising=False)
        ref = ops.quantize(x, None, down_t)
        monkeypatch.setenv("DCC_W4A4_LORA_DOWN", "blocked")
        got = ops.quantize(x, None, down_t)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        want = cn.lora_down_act(x, down, dtype)
        for name, v in (("quant_act", ref[2]), ("blocked", got[2])):
            assert torch.equal(v.view(torch.int32), want.view(torch.int32)), (name, m, k, rank)


def _exact_gemm(t, dtype):
    """float64 result of the GEMM's own inputs: sum_g psum * ascale * wscale + bias + lora_act . lora_up^T, and the
    same sum over the terms' magnitudes (what an fp32 accumulation's error scales with)."""
    m, k = t["acodes"].shape
    n = t["wcodes"].shape[0]
    a = t["acodes"].double().view(m, k // 64, 64) * t["ascales"].double().unsqueeze(-1)
    w = t["wcodes"].double().view(n, k // 64, 64) * t["wscales"].double().unsqueeze(-1)
    y = a.reshape(m, k) @ w.reshape(n, k).T
    mag = a.reshape(m, k).abs() @ w.reshape(n, k).abs().T
    if t["bias"] is not None:
        y, mag = y + t["bias"].double(), mag + t["bias"].double().abs()
    if t["lora_act"] is not None:
        y = y + t["lora_act"].double() @ t["lora_up"].double().T
        mag = mag + t["lora_act"].double().abs() @ t["lora_up"].double().abs().T
    return y, mag


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_kernel3_bit_identical(ops, knob, dtype):
    """The third kernel (wgmma3_kernel.cuh: the main loop pipelined within each warpgroup, 64-token halves in two
    sets of sums) with its CUDA-core low-rank epilogue, and the fourth (wgmma4_kernel.cuh: four warpgroups of 64 x 64
    quadrants): the same bits as mma.sync and the emulation -- one stage and
    odd stage counts (the stage-pair loop's tail), M cut inside a tile, ranks 0 / 32 / 64 / 128, unsigned codes, a
    FLUX.1 shape at M = 4096 (many tiles per CTA)."""
    for m, n, k, rank, bias, unsigned in ((1, 128, 128, 32, True, False), (77, 256, 384, 64, False, True),
                                          (129, 384, 1024, 0, True, False), (300, 128, 640, 128, True, True),
                                          (2000, 1280, 512, 32, False, False), (4096, 3072, 3072, 32, True, False)):
        t = _layer(m, n, k, rank, bias, dtype, unsigned, _gen("k3", m, n, k, rank, dtype))
        want = _reference(ops, t, dtype)
        for kernel in (3, 4):
            knob(f"kernel={kernel}")
            assert ops.ext().gemm_wgmma_kernel(m, n, rank) == kernel
            _same(_run(ops, t, "wgmma_fp8"), want, f"kernel={kernel} m={m} n={n} k={k} rank={rank}")
            _same(_run(ops, t, "wgmma"), want, f"kernel={kernel} (s8: kernel 2) m={m} n={n} k={k} rank={rank}")
        knob(None)
        if rank == 0:   # wgmma_tc at rank 0 is the same kernel with no low-rank branch
            _same(_run(ops, t, "wgmma_tc"), want, f"wgmma_tc rank 0 m={m} n={n} k={k}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_tc_within_rounding_of_exact(ops, dtype):
    """path wgmma_tc (the low rank as tf32 wgmmas of lora_up and lora_act split in two): every output within one
    16-bit ulp of the exact result of its inputs plus 2^-17 of the magnitude of its terms (the split drops at most
    2^-21 of each lora_act, and the tensor cores add the 2R products to the accumulators in fp32, in an order of
    their own: an output much smaller than its terms can be a few of its own ulps off), equal to the correctly
    rounded exact result almost everywhere, and its error against exact (relative to the largest output) no larger
    than the bit-exact path's."""
    for m, n, k, rank, bias, unsigned in ((1, 128, 128, 32, True, False), (77, 256, 384, 64, False, True),
                                          (300, 128, 640, 128, True, True), (4096, 3072, 3072, 32, True, False),
                                          (1024, 3072, 12288, 32, True, False)):
        t = _layer(m, n, k, rank, bias, dtype, unsigned, _gen("tc", m, n, k, rank, dtype))
        exact, mag = _exact_gemm(t, dtype)
        got = _run(ops, t, "wgmma_tc")
        dist = cn.ulp_distance(got.cpu(), exact.to(dtype).cpu())
        what = f"wgmma_tc m={m} n={n} k={k} rank={rank} {dtype}"
        e16 = exact.to(dtype).cpu().abs()   # one ulp of the 16-bit value at each output
        ulp = torch.nextafter(e16, torch.tensor(float("inf"), dtype=dtype)).double() - e16.double()
        bound = ulp + mag.cpu() * 2.0 ** -17
        over = (got.cpu().double() - exact.cpu()).abs() > bound
        assert not bool(over.any()), f"{what}: {int(over.sum())} outputs beyond 1 ulp + 2^-17 of their terms"
        assert float((dist == 0).double().mean()) >= 0.99, f"{what}: {float((dist != 0).double().mean()):.2%} off"
        err = cn.relative_error(got, exact)["max"]
        err_exact_path = cn.relative_error(_run(ops, t, "wgmma_fp8"), exact)["max"]
        print(f"\n{what}: rel err vs exact {err:.2e} (bit-exact path {err_exact_path:.2e}), "
              f"{float((dist == 0).double().mean()):.4%} correctly rounded")
        assert err <= err_exact_path * 1.01 + 1e-7


@gpu
def test_wgmma_tc_refusals(ops):
    t = _layer(64, 192, 256, 32, False, torch.float16, False, _gen("tc_refuse"))
    with pytest.raises(ValueError, match="N % 128"):
        _run(ops, t, "wgmma_tc")
    t = _layer(64, 256, 256, 16, False, torch.float16, False, _gen("tc_refuse16"))
    with pytest.raises(ValueError, match="multiples of 32"):
        _run(ops, t, "wgmma_tc")


if os.environ.get("DCC_W4A4_WGMMA"):   # a knob left set would change what the tests above run
    pytest.skip("unset DCC_W4A4_WGMMA to run these tests", allow_module_level=True)
