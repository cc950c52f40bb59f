"""GPU tests of the W4A8 CUDA runtime (csrc/w4a8 through dcc.runtime.cuda.w4a8_ops) for QServe-layout tensors.

Activation quantization must be bit-identical to dcc.ir.actquant (codes, scales; the sum equals fp16 of the exact
sum). The GEMM gets fresh random codes, scales and activations per check (codes packed by dcc.targets.qserve.layout,
progressive bounds q*s2 <= 255 and (q-z)*s2 in int8 respected), a NaN-poisoned output, and is compared with the
result of QServe's kernels: an integer GEMM in float64 (exact below 2^53) and QServe's float32 epilogue
(dcc.targets.qserve.numerics, the CPU reference's). Every kernel (split-K, tiled, the automatic choice, and wgmma and the cluster GEMV
where built) is checked."""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest
import torch

from dcc.ir.actquant import quantize_tokens_int8
from dcc.targets.qserve import numerics
from dcc.targets.qserve.layout import int8_codes_g128, pack_qweight, pack_s2
from cuda_util import require_family

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MS = (1, 3, 8, 9, 16, 17, 32, 33, 64, 65, 130, 257)
# the last shapes of each group also suit the wgmma kernel (N % 256, K % 128), with K splits at small and large M
SHAPES = {0: ((32, 32), (96, 160), (192, 576), (576, 192), (1536, 576), (576, 1536), (512, 1024), (256, 2048)),
          64: ((32, 64), (96, 192), (192, 576), (1536, 576), (512, 640)),
          128: ((32, 128), (192, 384), (576, 1536), (1536, 1536), (768, 1024))}
KERNELS = ("splitk", "tile", "auto", "wgmma", "gemv")
_STATS: list[dict] = []


@pytest.fixture(scope="module")
def ops():
    from dcc.runtime.cuda import w4a8_ops
    require_family("w4a8")
    yield w4a8_ops
    if _STATS:  # summary of every GEMM check: printed, and written where DCC_W4A8_TEST_REPORT points
        n = sum(s["n"] for s in _STATS)
        eq = sum(s["equal"] for s in _STATS)
        summary = {"checks": len(_STATS), "outputs": n, "bit_equal": eq / n,
                   "max_ulp": max(s["max_ulp"] for s in _STATS),
                   "kernels": sorted({s["kernel"] for s in _STATS})}
        print("\nW4A8 GEMM summary:", json.dumps(summary))
        if os.environ.get("DCC_W4A8_TEST_REPORT"):
            with open(os.environ["DCC_W4A8_TEST_REPORT"], "w") as f:
                json.dump({"summary": summary, "checks": _STATS}, f, indent=1)


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF)


def make_layer(n: int, k: int, group: int, gen: torch.Generator) -> dict:
    """Random QServe tensors (CPU) and the integer weight the GEMM multiplies: codes (group 0) or w8 (groups)."""
    codes = torch.randint(0, 16, (n, k), generator=gen)
    s1 = (0.0005 + 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)).to(torch.float16)
    t = {"qweight": pack_qweight(codes), "s1_scales": s1, "s1_szeros": None, "s2_scales": None, "s2_zeros": None}
    if group == 0:
        z = torch.randint(0, 16, (n,), generator=gen)
        t["s1_szeros"] = (z * s1.double()).to(torch.float16)
        t["ints"] = codes
    else:
        ng = k // group
        s2 = torch.randint(1, 17, (n, ng), generator=gen)
        # zero points that keep (q - z)*s2 in [-128, 127] for every q in 0..15 (QServe's progressive bound)
        lo, hi = (15 - 127 // s2).clamp(min=0), (128 // s2).clamp(max=15)
        z = lo + (torch.rand(n, ng, generator=gen) * (hi - lo + 1)).floor().long().clamp(max=hi - lo)
        t["s2_scales"], t["s2_zeros"] = pack_s2(s2), pack_s2(-z * s2)
        t["ints"] = int8_codes_g128(t["qweight"], t["s2_scales"], t["s2_zeros"], n, k)   # raises if a bound breaks
    return t


def make_x(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """fp16 activations with per-token magnitudes over 2^-6..2^6 and a few outlier channels."""
    x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-6, 7, (m, 1), generator=gen).float())
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 16
    return x.to(torch.float16)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(t):
        v = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(v >= 0, v, -(v & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def test_quant_act_bit_identical(ops):
    gen = _gen("quant")
    for m, k in ((1, 32), (3, 576), (17, 1536), (64, 4096), (5, 14336), (2, 40), (4, 7)):
        x = make_x(m, k, gen).cuda()
        x[0, :] = 0                                          # an all-zero token: codes 0, scale 0
        if k >= 8:                                           # ties: amax 127 -> inv 1.0, x*inv = 2.5 etc.
            x[-1, :8] = torch.tensor([127, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -127], dtype=torch.float16)
            x[-1, 8:] = 0
        xq, scale, ssum = ops.quantize_act(x)
        ref = quantize_tokens_int8(x.cpu().float())
        assert torch.equal(xq.cpu().float(), ref.codes), (m, k)
        assert torch.equal(scale.cpu().view(torch.int16), ref.scale.view(-1).view(torch.int16)), (m, k)
        # fp16 of the exact sum (the float64 sum is exact here), rounded once as numpy does
        exact_sum = torch.from_numpy(x.cpu().double().sum(-1).numpy().astype(np.float16))
        assert torch.equal(ssum.cpu().view(torch.int16), exact_sum.view(torch.int16)), (m, k)
        assert int(ulps(ssum.cpu(), ref.sum.view(-1)).max()) <= 1
        if k >= 8:
            assert xq[-1, :8].tolist() == [127, 2, 4, -2, 0, 0, 2, -127]


def _reference(lay: dict, xq, scale, ssum) -> torch.Tensor:
    """QServe's epilogue in its float32 order (dcc.targets.qserve.numerics) on the exact integer GEMM."""
    psum = xq.double() @ lay["ints"].cuda().double().t()        # exact: integers below 2^53
    s1 = lay["s1_scales"].cuda().view(1, -1)
    if lay["s1_szeros"] is not None:
        return numerics.epilogue_per_channel(psum, s1, lay["s1_szeros"].cuda().view(1, -1), scale.view(-1, 1),
                                             ssum.view(-1, 1))
    return numerics.epilogue_scaled(psum, s1, scale.view(-1, 1))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("group,n,k", [(g, n, k) for g, shapes in SHAPES.items() for n, k in shapes])
def test_gemm_exact(ops, group, n, k, kernel):
    ext = ops.ext()
    checked = 0
    for m in MS:
        if (kernel == "splitk" and m > 32) or (kernel == "gemv" and m > 16):
            continue
        if kernel == "gemv" and not ext.gemm_gemv_available():
            continue
        if kernel == "wgmma" and not ext.gemm_wgmma_supported(m, n, k, group):
            continue
        gen = _gen(group, n, k, kernel, m)
        lay = make_layer(n, k, group, gen)
        dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
        xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                 dev["s2_zeros"], group, path=kernel, out=out)
        ref = _reference(lay, xq, scale, ssum)
        assert bool(torch.isfinite(out).all()), f"unwritten or non-finite outputs at M={m}"
        d = ulps(out, ref)
        equal, worst = int((d == 0).sum()), int(d.max())
        _STATS.append({"kernel": kernel, "group": group, "M": m, "N": n, "K": k, "n": d.numel(), "equal": equal,
                       "max_ulp": worst})
        assert worst <= 1 and equal >= 0.999 * d.numel(), (m, worst, equal / d.numel())
        checked += 1
    if checked == 0:
        pytest.skip(f"{kernel} takes none of these shapes here")


def _check_wgmma(ops, lay, group, m, k, gen, note, calls=2):
    """One layer through the wgmma kernel, `calls` times into NaN-poisoned outputs (nothing may carry over between
    calls), against the exact reference."""
    dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
    n = lay["s1_scales"].numel()
    xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
    ref = _reference(lay, xq, scale, ssum)
    for _ in range(calls):
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                 dev["s2_zeros"], group, path="wgmma", out=out)
        d = ulps(out, ref)
        assert bool(torch.isfinite(out).all()), (note, m)
        assert int(d.max()) <= 1 and int((d == 0).sum()) >= 0.999 * d.numel(), (note, m, int(d.max()))


@pytest.mark.parametrize("splits", (1, 2, 3, 4, 6, 7, 8))
@pytest.mark.parametrize("group", (0, 64, 128))
def test_wgmma_forced_splits_exact(ops, monkeypatch, group, splits):
    """The wgmma kernel with its K split count (= cluster size) forced by DCC_W4A8_WGMMA=splits=S (where the GPU and
    the tile configuration allow it): 10 k stages in 3, 4, 7 or 8 splits are uneven (3/3/4, 2/3/2/3, 1/1/2/..., with
    consumer warps shared unevenly by the 3 or 7 CTAs of the reduction), 5 per split reuse the ring; M = 1..16 on the
    16-token tile, 17, 65 and 160 (1-3 m tiles) on the 64-token tile, 300 (3 m tiles) on the 128-token tile."""
    ext = ops.ext()
    n, k = 512, 1280
    if not ext.gemm_wgmma_supported(16, n, k, group):
        pytest.skip("the wgmma kernel is not built for this GPU")
    monkeypatch.setenv("DCC_W4A8_WGMMA", f"splits={splits}")
    gen = _gen("splits", group, splits)
    lay = make_layer(n, k, group, gen)
    for m in (1, 5, 16, 17, 65, 160, 300):
        _check_wgmma(ops, lay, group, m, k, gen, f"splits={splits}")


@pytest.mark.parametrize("group", (0, 128))
@pytest.mark.parametrize("m", (16, 100, 257))
def test_wgmma_persistent_exact(ops, monkeypatch, group, m):
    """Unsplit, with more than twice as many tiles as SMs: each CTA of the persistent grid runs several tiles and
    the producer refills the ring for the next tile while the consumers finish the last (16-, 64- and 128-token
    tiles; 100 and 257 leave partial m tiles)."""
    ext = ops.ext()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m_tiles = {16: 1, 100: 2, 257: 3}[m]   # 16-, 64- and 128-token tiles; 256 channels each
    n = 256 * -(-(2 * sms + 1) // m_tiles)
    k = 256
    if not ext.gemm_wgmma_supported(m, n, k, group):
        pytest.skip("the wgmma kernel is not built for this GPU")
    # one split; 64-token tiles at M = 100 (this many tiles would choose the 128-token ones), 128 at M = 257
    monkeypatch.setenv("DCC_W4A8_WGMMA", "splits=1,tile=" + ("64" if m == 100 else "128"))
    gen = _gen("persistent", group, m)
    _check_wgmma(ops, make_layer(n, k, group, gen), group, m, k, gen, f"n={n}")


@pytest.mark.parametrize("splits", (1, 2))
def test_wgmma_per_channel_largest_k_exact(ops, monkeypatch, splits):
    """Per channel at M <= 16 the wgmma kernel sums whole weight bytes (low nibble + 16 x high, up to 255) times the
    int8 activations in int32 and recovers the high-nibble sums by a subtraction: at the largest K it accepts
    (65536), with every code 15 on half the channels and activations of magnitude 127, those sums come within 1%
    of 2^31. Outputs exact against the reference; one more k stage is refused (other kernels take it)."""
    ext = ops.ext()
    n, k = 256, 65536
    if not ext.gemm_wgmma_supported(16, n, k, 0):
        pytest.skip("the wgmma kernel is not built for this GPU")
    assert not ext.gemm_wgmma_supported(16, n, k + 128, 0)
    assert ext.gemm_wgmma_supported(17, n, k + 128, 0) and ext.gemm_wgmma_supported(16, n, k + 128, 128)
    monkeypatch.setenv("DCC_W4A8_WGMMA", f"splits={splits}")
    gen = _gen("largest k", splits)
    lay = make_layer(n, k, 0, gen)
    codes = lay["ints"].clone()
    codes[: n // 2] = 15
    lay["ints"], lay["qweight"] = codes, pack_qweight(codes)
    # |x| = 0.99 everywhere quantizes to 127 and keeps the fp16 token sums (QServe's asum) finite: 0.99 K < 65504
    x = torch.full((16, k), 0.99, dtype=torch.float16)
    x[1::2] = -0.99
    x[2, ::7] = 0.25   # a token with other values
    dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
    xq, scale, ssum = ops.quantize_act(x.cuda(), with_sum=True)
    assert int(xq.abs().max()) == 127
    ref = _reference(lay, xq, scale, ssum)
    out = torch.full((16, n), float("nan"), dtype=torch.float16, device="cuda")
    ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], None, None, 0, path="wgmma",
             out=out)
    d = ulps(out, ref)
    assert bool(torch.isfinite(out).all()) and int(d.max()) <= 1 and int((d == 0).sum()) >= 0.999 * d.numel()


@pytest.mark.parametrize("group", (0, 64, 128))
def test_linear_matches_cpu_reference(ops, group):
    """w4a8_linear (quantization + GEMM on the GPU) against dcc.targets.qserve.reference.QServeLinear on the CPU."""
    from dcc.targets.qserve.reference import QServeLinear

    n, k = 192, 576 if group != 128 else 768
    gen = _gen("linear", group)
    lay = make_layer(n, k, group, gen)
    fmt = "qserve-w4a8-per-channel" if group == 0 else "qserve-w4a8-group"
    names = ("qweight", "s1_scales", "s1_szeros") if group == 0 else ("qweight", "s1_scales", "s2_scales",
                                                                        "s2_zeros")
    ref_layer = QServeLinear(fmt, {t: lay[t] for t in names}, n, k, None)
    rows = same = 0
    for m in (1, 5, 16, 40, 300):
        x = make_x(m, k, gen)
        ref = ref_layer(x.float()).to(torch.float16)
        got = ops.w4a8_linear(x.cuda(), *(None if lay[t] is None else lay[t].cuda() for t in
                                          ("qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros")), group)
        assert bool(torch.isfinite(got).all())
        # the CPU sums each token in float32 in QServe's order, the GPU exactly: where the fp16 sums agree (all
        # rows for groups, which do not use the sum) the outputs must be bit-identical
        agree = torch.ones(m, dtype=torch.bool) if group else \
            ops.quantize_act(x.cuda())[2].cpu().view(torch.int16) == numerics.quantize_tokens(x.float()).sum.view(
                -1).to(torch.float16).view(torch.int16)
        assert torch.equal(got.cpu()[agree].view(torch.int16), ref[agree].view(torch.int16))
        rows, same = rows + m, same + int(agree.sum())
    assert same >= 0.9 * rows


def test_bad_arguments(ops):
    q = torch.zeros(64, 32, dtype=torch.int8, device="cuda")
    s1 = torch.ones(64, dtype=torch.float16, device="cuda")
    x = torch.zeros(2, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="s1_szeros"):
        ops.w4a8_linear(x, q, s1, None, None, None, 0)
    with pytest.raises(ValueError, match="multiples of 32"):
        ops.w4a8_linear(x, torch.zeros(48, 32, dtype=torch.int8, device="cuda"), s1[:48], s1[:48], None, None, 0)
    with pytest.raises(ValueError, match="features"):
        ops.w4a8_linear(x[:, :32], q, s1, s1, None, None, 0)
    with pytest.raises(ValueError, match="group"):
        ops.w4a8_linear(x, q, s1, None, None, None, 32)
    with pytest.raises(ValueError, match="s2_scales"):
        ops.w4a8_linear(x, q, s1, None, torch.zeros(1, 64, dtype=torch.int16, device="cuda"),
                        torch.zeros(1, 64, dtype=torch.int8, device="cuda"), 64)


@pytest.mark.parametrize("group", (0, 64))
def test_kernel_variants_exact(ops, group):
    """The split-K kernel's wide block shape (4) and forced split counts (kernel codes of gemm_mma_kernel), repeated
    calls included (the workspace must come back zero). The benchmark-only shapes and the stream-K kernel are not in
    the product (dev/cuda/w4a8/test_variants.py tests them)."""
    codes = [1 | (4 << 4)] + [1 | (s << 8) for s in (1, 2, 3, 7)]
    codes += [1 | (4 << 4) | (1 << 8), 1 | (4 << 4) | (2 << 8)] * 2
    for n, k in ((192, 576), (1536, 576), (32, 4096)):
        for m in (1, 9, 16):
            gen = _gen("variants", group, n, k, m)
            lay = make_layer(n, k, group, gen)
            dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
            xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
            ref = _reference(lay, xq, scale, ssum)
            for code in codes:
                out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                         dev["s2_zeros"], group, path=code, out=out)
                assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (hex(code), m, n, k)
            for code in (3, 1 | (1 << 4)):   # stream-K, split-K shape 1: benchmark-only, not built here
                with pytest.raises(RuntimeError):
                    ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                             dev["s2_zeros"], group, path=code)


# (row tiles per CTA, CTAs sharing staged activations at M > 8) of the cluster GEMV's block shapes, variants 1..10
# (kShapes in csrc/w4a8/gemm_gemv.cu)
GEMV_SHAPES = {1: (1, 1), 2: (1, 1), 3: (1, 1), 4: (1, 1), 5: (1, 1), 6: (4, 1), 7: (4, 1), 8: (1, 2), 9: (1, 2),
               10: (4, 2)}


@pytest.mark.parametrize("group", (0, 64, 128))
def test_gemv_variants_exact(ops, group):
    """The cluster GEMV with every block shape and K split count forced, twice per call into NaN-poisoned outputs:
    uneven splits (18 k tiles in 4 or 8), warps without tiles (K = 256 over 16 warps), one and two token groups
    with partial ones (M = 1, 3, 9, 16), activations staged with one token group (M = 5: these layers are small),
    multicast to 2 CTAs where staged (clusters of splits x sharing CTAs up to 8), and 3 row tiles (N = 96:
    one-row shapes without sharing only). Grouped weights split K at group boundaries (at most K / group splits;
    9 groups in 2, 4 or 8 at K = 576, g64); more splits are refused."""
    ext = ops.ext()
    if not ext.gemm_gemv_available():
        pytest.skip("the cluster GEMV is not built for this GPU (sm_90+)")
    shapes = ((128, 1152), (256, 640), (384, 640), (96, 256))
    if group == 64:
        shapes = ((128, 576),) + shapes[1:]
    for n, k in shapes:
        for m in (1, 3, 5, 9, 16):
            gen = _gen("gemv", group, n, k, m)
            lay = make_layer(n, k, group, gen)
            dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
            xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
            ref = _reference(lay, xq, scale, ssum)
            for v, (rows, share) in GEMV_SHAPES.items():
                staged = m > 8 or (m > 4 and n * k // 2 <= 16 << 20)   # gemm_gemv.cu, token_groups
                share = share if staged else 1
                for s in (0, 1, 2, 4, 8):
                    if n % (32 * rows * share) or s > k // (group or 32) or s * share > 8:
                        with pytest.raises(RuntimeError):   # the layer cannot take this shape or split
                            ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"],
                                     dev["s2_scales"], dev["s2_zeros"], group, path=4 | (v << 4) | (s << 8))
                        continue
                    for _ in range(2):
                        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                        ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"],
                                 dev["s2_scales"], dev["s2_zeros"], group, path=4 | (v << 4) | (s << 8), out=out)
                        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (v, s, m, n, k)


@pytest.mark.parametrize("group", (0, 128))
def test_gemv_large_layer_exact(ops, group):
    """A layer of more than 16 MB of weights (bandwidth-bound): there the cluster GEMV loads the activation words
    with the weights up to M = 8 (every lane's token at M = 8) and stages them above."""
    ext = ops.ext()
    if not ext.gemm_gemv_available():
        pytest.skip("the cluster GEMV is not built for this GPU (sm_90+)")
    n, k = 1024, 32896   # 16.06 MiB of 4-bit weights (the bound: 16 MiB)
    gen = _gen("gemv-large", group)
    lay = make_layer(n, k, group, gen)
    dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
    for m in (6, 8, 12):
        xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                 dev["s2_zeros"], group, path="gemv", out=out)
        ref = _reference(lay, xq, scale, ssum)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), m


@pytest.mark.parametrize("group", (0, 128))
def test_quant_gemm_chain_exact(ops, group):
    """Quantization + GEMM pairs queued back to back through one activation buffer, as consecutive layers run them.
    Both kernels launch with programmatic dependent launch, so a GEMM's CTAs may start while the pair before it
    still runs: each quantization must wait until the previous GEMM has read the codes it overwrites, and each GEMM
    until its own codes are written. A GEMM that read its neighbour's codes would match the wrong reference."""
    ext = ops.ext()
    n, k = 4096, 4096   # 8 MB of weights: the cluster GEMV at these M, two CTAs per SM at M = 16 per channel
    gen = _gen("chain", group)
    lay = make_layer(n, k, group, gen)
    dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
    for m in (1, 16):
        xs = [make_x(m, k, gen).cuda() for _ in range(6)]
        refs = [_reference(lay, *ops.quantize_act(x, with_sum=group == 0)) for x in xs]
        xq = torch.empty(m, k, dtype=torch.int8, device="cuda")
        scale = torch.empty(m, dtype=torch.float16, device="cuda")
        ssum = torch.empty(m, dtype=torch.float16, device="cuda") if group == 0 else None
        outs = [torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda") for _ in xs]
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream().cuda_stream
        for x, out in zip(xs, outs):
            ext.quant_act(x.data_ptr(), xq.data_ptr(), scale.data_ptr(), 0 if ssum is None else ssum.data_ptr(),
                          m, k, stream)
            ops.gemm(xq, scale, ssum, dev["qweight"], dev["s1_scales"], dev["s1_szeros"], dev["s2_scales"],
                     dev["s2_zeros"], group, out=out)
        torch.cuda.synchronize()
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (m, i)


def _at_offset(t: torch.Tensor, elems: int) -> torch.Tensor:
    """The same values in a view that starts `elems` elements into a fresh buffer (misaligned for elems = 1)."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    view = buf[elems:]
    view.copy_(t)
    return view


@pytest.mark.parametrize("group", (0, 128))
def test_gemv_scales_misaligned_exact(ops, group):
    """The cluster GEMV copies its epilogue scales into shared memory with 16-byte cp.async where every scale
    pointer is 16-byte aligned, and reads them from global memory otherwise: both paths, over one and two token
    chunks with partial ones (M = 1, 7, 9, 16), with split and unsplit K (the default shape, forced S = 2)."""
    ext = ops.ext()
    if not ext.gemm_gemv_available():
        pytest.skip("the cluster GEMV is not built for this GPU (sm_90+)")
    n, k = 256, 640
    for m in (1, 7, 9, 16):
        gen = _gen("gemv-align", group, m)
        lay = make_layer(n, k, group, gen)
        dev = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
        xq, scale, ssum = ops.quantize_act(make_x(m, k, gen).cuda(), with_sum=group == 0)
        ref = _reference(lay, xq, scale, ssum)
        for off in (0, 1):   # elements: 1 = 2 bytes past a 16-byte boundary
            sc, sm = _at_offset(scale, off), None if ssum is None else _at_offset(ssum, off)
            s1 = _at_offset(dev["s1_scales"], off)
            sz = None if dev["s1_szeros"] is None else _at_offset(dev["s1_szeros"], off)
            for s in (0, 2):
                out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                ops.gemm(xq, sc, sm, dev["qweight"], s1, sz, dev["s2_scales"], dev["s2_zeros"], group,
                         path=4 | (s << 8), out=out)
                assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (m, off, s)
