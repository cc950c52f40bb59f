"""GPU tests of the W4A16 CUDA runtime (csrc/w4a16 through dcc.runtime.cuda) against the layout's own decoder.

Imports only torch, dcc.targets.common.awq_layout and dcc.runtime.cuda (no transformers). Each check draws fresh random
codes, scales, zero points and activations, poisons the output with NaN before the kernel runs, and compares with a
float64 reference x @ decode_weight(...)^T."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from dcc.targets.common.awq_layout import decode_weight, pack_qweight, pack_scales

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Tolerances on ||out - ref|| / ||ref||. The kernels see exactly the inputs the reference sees (x as given, W bit-equal
# to decode_weight), multiply exactly (16-bit products are exact in fp32) and accumulate in fp32, whose error is
# ~sqrt(K) * 2^-24 (< 1e-5 here). What remains is the one rounding of each output to the 16-bit type: at most 2^-11
# = 4.9e-4 relative per element for fp16 and 2^-8 = 3.9e-3 for bf16 (RMS about a third of that), so 2e-3 (fp16) and
# 1e-2 (bf16) leave a margin of 4x and 2.5x over the worst case while any indexing or layout error (which gives O(1))
# fails by orders of magnitude.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = (64, 128)
MS = (1, 2, 3, 7, 8, 9, 33, 257)


def require_runtime():
    """dcc.runtime.cuda with its extension built, or a skip with the reason (a build error in csrc/ is a failure)."""
    from dcc.runtime import cuda

    try:
        cuda.require()
    except cuda.CudaRuntimeUnavailable as e:
        if "nvcc failed" in str(e):
            raise
        pytest.skip(str(e).splitlines()[0])
    return cuda


@pytest.fixture(scope="module")
def rt():
    return require_runtime()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_layer(n: int, k: int, g: int, dtype: torch.dtype, gen: torch.Generator, spread: float = 0.0):
    """Random TinyChat tensors on the GPU: codes 0..15, zero points 0..15, scales exactly representable in dtype
    (spread > 0 draws them over 2^-spread .. 1 instead of a narrow band)."""
    codes = torch.randint(0, 16, (n, k), generator=gen)
    ng = k // g
    if spread:
        scale = torch.exp2(-spread * torch.rand(n, ng, generator=gen, dtype=torch.float64)) * 0.05
    else:
        scale = 0.002 + 0.02 * torch.rand(n, ng, generator=gen, dtype=torch.float64)
    scale = scale.to(dtype)
    zero = torch.randint(0, 16, (n, ng), generator=gen)
    qweight = pack_qweight(codes)
    scales, scaled_zeros = pack_scales(scale, zero, g, dtype)
    dev = torch.device("cuda")
    return qweight.to(dev), scales.to(dev), scaled_zeros.to(dev)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def reference(x, qweight, scales, scaled_zeros, g, bias=None):
    w = decode_weight(qweight, scales, scaled_zeros, g, qweight.shape[1]).double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def check_linear(rt, m, n, k, g, dtype, path, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    qw, s, sz = make_layer(n, k, g, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poison: every element must be written
    y = rt.w4a16_linear(x, qw, s, sz, g, b, path=path, out=out)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr() and y.shape == (m, n) and y.dtype == dtype
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs not written or not finite"
    err = rel_err(y, reference(x, qw, s, sz, g, b))
    assert err < TOL[dtype], f"M={m} N={n} K={k} G={g} {dtype} {path}: relative error {err:.3e}"
    return err


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("path", ["fused", "gemm", "gemm_ext", "auto"])
def test_linear_random_shapes(rt, dtype, g, path):
    # N: multiples of 64; K: multiples of the group size, including K % 128 == 64 (a half 128-k step) for g = 64.
    rng = torch.Generator().manual_seed(_seed("shapes", str(dtype), g, path))
    for i, m in enumerate(MS):
        n = 64 * int(torch.randint(1, 17, (1,), generator=rng))
        k = g * int(torch.randint(1, 2048 // g + 1, (1,), generator=rng))
        check_linear(rt, m, n, k, g, dtype, path, seed=_seed(str(dtype), g, path, m, i))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,g", [(1, 4096, 4096, 128), (5, 1024, 14336, 128), (8, 14336, 512, 64),
                                     (1, 4, 64, 64), (2, 20, 192, 64), (16, 4092, 128, 128), (64, 256, 8192, 128)])
def test_linear_edge_shapes(rt, dtype, m, n, k, g):
    # N not a multiple of 16 (partial row tile), tiny K (idle warps), long K (many iterations per warp), real sizes.
    for path in ("fused", "gemm", "gemm_ext"):
        check_linear(rt, m, n, k, g, dtype, path, seed=_seed("edge", str(dtype), m, n, k, g, path))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", ["fused", "gemm", "gemm_ext"])
def test_linear_bias_and_batch_dims(rt, dtype, path):
    for m in (1, 6, 40):
        check_linear(rt, m, 192, 256, 128, dtype, path, seed=_seed("bias", str(dtype), path, m), bias=True)
    gen = torch.Generator().manual_seed(_seed("batch", str(dtype), path))
    qw, s, sz = make_layer(128, 256, 64, dtype, gen)
    x = torch.randn(2, 3, 256, generator=gen).to(dtype).cuda()
    y = rt.w4a16_linear(x, qw, s, sz, 64, path=path)
    assert y.shape == (2, 3, 128)
    assert rel_err(y, reference(x.reshape(6, 256), qw, s, sz, 64).reshape(2, 3, 128)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_all_mtiles_and_streams(rt, dtype):
    """Every fused instantiation (mtiles 1, 2, 4, 8, with chunking of M) on a side stream."""
    ext = rt.load()
    gen = torch.Generator().manual_seed(_seed("mtiles", str(dtype)))
    n, k, g = 320, 640, 64
    qw, s, sz = make_layer(n, k, g, dtype, gen)
    side = torch.cuda.Stream()
    for mt, m in itertools.product((1, 2, 4, 8), (1, 2, 3, 8, 13, 70)):
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ext.gemv(x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(), m, n, k, g,
                     "float16" if dtype == torch.float16 else "bfloat16", mt, side.cuda_stream)
        side.synchronize()
        assert bool(torch.isfinite(out).all())
        assert rel_err(out, reference(x, qw, s, sz, g)) < TOL[dtype], f"mtiles={mt} M={m}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g", (32, 64, 128))
def test_dequantize_bit_exact(rt, dtype, g):
    rng = torch.Generator().manual_seed(_seed("deq", str(dtype), g))
    for i in range(4):
        n = 4 * int(torch.randint(1, 300, (1,), generator=rng))
        k = 64 * int(torch.randint(1, 40, (1,), generator=rng))
        k -= k % g
        k = max(k, g if g >= 64 else 64)
        gen = torch.Generator().manual_seed(_seed("deq", str(dtype), g, i))
        # scales over many binades (fp16: down into subnormal products) to exercise the single-rounding FMA
        qw, s, sz = make_layer(n, k, g, dtype, gen, spread=12.0 if i % 2 else 0.0)
        w = rt.dequantize(qw, s, sz, g, k)
        ref = decode_weight(qw, s, sz, g, k)
        assert w.dtype == dtype and w.shape == (n, k)
        assert torch.equal(w.view(torch.int16), ref.view(torch.int16)), (
            f"N={n} K={k} G={g}: {int((w.view(torch.int16) != ref.view(torch.int16)).sum())} weights differ")


def test_rejects_bad_inputs(rt):
    gen = torch.Generator().manual_seed(1)
    qw, s, sz = make_layer(64, 256, 128, torch.float16, gen)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        rt.w4a16_linear(x.bfloat16(), qw, s, sz, 128)
    with pytest.raises(ValueError, match="features"):
        rt.w4a16_linear(x[:, :128], qw, s, sz, 128)
    with pytest.raises(ValueError, match="scales has shape"):
        rt.w4a16_linear(x, qw, s, sz, 64)
    with pytest.raises(ValueError, match="CUDA"):
        rt.w4a16_linear(x.cpu(), qw, s, sz, 128)
    with pytest.raises(ValueError):
        rt.load().check_problem(1, 6, 256, 128)


def test_module_forward(rt):
    """W4A16Linear (what build_cuda_model puts in place of quantized linears) matches the reference."""
    from dcc.targets.tinychat.cuda import W4A16Linear

    gen = torch.Generator().manual_seed(7)
    qw, s, sz = make_layer(256, 512, 128, torch.bfloat16, gen)
    b = torch.randn(256, generator=gen).bfloat16().cuda()
    mod = W4A16Linear(qw, s, sz, 128, b)
    assert isinstance(mod, torch.nn.Linear) and mod.out_features == 256
    x = torch.randn(3, 512, generator=gen).bfloat16().cuda()
    assert rel_err(mod(x), reference(x, qw, s, sz, 128, b)) < TOL[torch.bfloat16]
    assert rel_err(mod(x.float()), reference(x, qw, s, sz, 128, b)) < TOL[torch.bfloat16]  # fp32 input is cast


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("inter", (1024, 3072, 14336))   # 16-warp blocks, the persistent grid, 4-warp blocks (H100)
def test_gate_up_glu_is_the_gemv_then_silu_mul(rt, dtype, inter):
    """gemv_glu over the interleaved gate_up weight: bit for bit the plain GEMV of [gate; up] followed by csrc/attn's
    silu_mul, at every M the lean GEMVs take; the fallback over the interleaved output (silu_mul with block 8) too."""
    from dcc.runtime.cuda.ops import w4a16_glu
    from dcc.runtime.fastlm.ops import silu_mul
    from dcc.targets.tinychat.fastlm import W4A16Glu, interleave_gate_up
    k, g = 512, 128
    gen = torch.Generator().manual_seed(_seed("glu", inter, str(dtype)))
    qw, s, sz = make_layer(2 * inter, k, g, dtype, gen)
    t = interleave_gate_up({"qweight": qw, "scales": s, "scaled_zeros": sz}, inter)
    for m in (1, 3, 8, 9):
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        gu = rt.w4a16_linear(x, qw, s, sz, g, path="fused")
        want = silu_mul(gu[:, :inter], gu[:, inter:], dtype)
        got = W4A16Glu(t, 2 * inter, g)(x)
        torch.cuda.synchronize()
        assert got.shape == (m, inter) and torch.equal(got.view(torch.int16), want.view(torch.int16)), (m, inter)
        if m <= 8:   # the epilogue itself (m = 9 went through the GEMV and silu_mul's interleaved form)
            assert torch.equal(w4a16_glu(x, t["qweight"], t["scales"], t["scaled_zeros"], g), got)
    with pytest.raises(ValueError, match="M <= 8"):
        w4a16_glu(torch.zeros(9, k, dtype=dtype, device="cuda"), t["qweight"], t["scales"], t["scaled_zeros"], g)


@pytest.mark.parametrize("glu", (False, True), ids=["plain", "glu"])
def test_lean_kinds_and_default_dispatch(rt, monkeypatch, glu):
    """DCC_W4A16_LEAN (the benchmark knob of the M <= 8 dispatch) runs each kernel kind within the rounding of the
    reference, and kinds with the same warps per tile give the same bits (the products, the k order of each warp and
    the order of the block reduction depend only on the warps). The default takes 4-warp blocks where they fit in one
    wave and the persistent 16-warp grid past it (big), the persistent grid between 1 and 2 rounds of 16-warp blocks
    (mid), one 16-warp block per tile below (small)."""
    from dcc.runtime.cuda.ops import w4a16_glu
    from dcc.targets.tinychat.fastlm import interleave_gate_up
    k, g, dtype = 1024, 128, torch.float16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    warps = {"w4": 4, "w4r2": 4, "w4u2": 4, "p4": 4, "w8": 8, "w8u2": 8, "p8": 8, "w16": 16, "w16u2": 16, "p16": 16}
    # row tiles per SM: 4-warp blocks hold at most 8 a SM at their 56-64 registers (16 past any SM's warp limit), and
    # 16-warp blocks 2, so 6 is one wave of 4-warp blocks and 20 more; 3 is the mid branch, 1 the small one
    for per_sm, key, default in ((6, "big", "w4"), (20, "big", "p16"), (3, "mid", "p16"), (1, "small", "w16")):
        n = 16 * per_sm * sms
        gen = torch.Generator().manual_seed(_seed("lean", n, glu))
        qw, s, sz = make_layer(n, k, g, dtype, gen)
        t = interleave_gate_up({"qweight": qw, "scales": s, "scaled_zeros": sz}, n // 2)
        x = torch.randn(3, k, generator=gen).to(dtype).cuda()

        def run():
            if glu:
                return w4a16_glu(x, t["qweight"], t["scales"], t["scaled_zeros"], g)
            return rt.w4a16_linear(x, qw, s, sz, g, path="fused")

        ref = reference(x, qw, s, sz, g)
        if glu:
            ref = torch.nn.functional.silu(ref[:, : n // 2]) * ref[:, n // 2:]
        got = {}
        for kind in (warps if per_sm != 20 else ("w4", "p16", "w16u2")):   # 20: the two defaults and one more
            monkeypatch.setenv("DCC_W4A16_LEAN", f"{key}={kind}")
            got[kind] = run()
            torch.cuda.synchronize()
            assert rel_err(got[kind], ref) < TOL[dtype], (n, kind)
        monkeypatch.delenv("DCC_W4A16_LEAN")
        plain = run()
        for kind, y in got.items():
            if warps[kind] == warps[default]:
                assert torch.equal(y.view(torch.int16), plain.view(torch.int16)), (n, kind, default)
        if "w4" in got and "p16" in got:   # the two warp counts differ somewhere (else the check above is empty)
            assert not torch.equal(got["w4"].view(torch.int16), got["p16"].view(torch.int16)), n
