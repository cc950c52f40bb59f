"""GPU tests of the Hopper W4A16 wgmma GEMM (csrc/w4a16/gemm_wgmma.cu) against the layout's own decoder: random and
real shapes, every token tile and K split, bias, rows past M, determinism, the automatic dispatch. Skipped where the
kernel cannot run (no sm_90 GPU or no sm_90a build)."""
from __future__ import annotations

import pytest
import torch

from runtime.test_cuda_w4a16 import TOL, _seed, check_linear, make_layer, reference, rel_err, require_runtime

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = (torch.float16, torch.bfloat16)
NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.fixture(scope="module")
def rt():
    cuda = require_runtime()
    if not cuda.load().gemm_wgmma_supported(64, 128, 128, 128):
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (Hopper) and an sm_90a build")
    return cuda


def _run(rt, x, qw, s, sz, g, bias=None, out=None):
    """The kernel through the extension; returns (out, splits launched)."""
    m, k = x.shape
    n = 4 * qw.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda") if out is None else out
    splits = rt.load().gemm_wgmma(x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(),
                                  0 if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, g, NAMES[x.dtype],
                                  torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out, splits


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g", (32, 64, 128))
def test_random_shapes(rt, dtype, g):
    rng = torch.Generator().manual_seed(_seed("wgmma-shapes", str(dtype), g))
    for i, m in enumerate((1, 17, 33, 64, 65, 130, 256, 300)):
        n = 128 * int(torch.randint(1, 9, (1,), generator=rng))
        k = 64 * int(torch.randint(1, 48, (1,), generator=rng))
        k -= k % g
        check_linear(rt, m, n, max(k, g, 64), g, dtype, "wgmma", seed=_seed("wgmma", str(dtype), g, m, i),
                     bias=bool(i % 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k", [(64, 4096, 4096), (256, 14336, 4096), (128, 4096, 14336), (48, 1024, 8192)])
def test_real_shapes(rt, dtype, m, n, k):
    check_linear(rt, m, n, k, 128, dtype, "wgmma", seed=_seed("wgmma-real", str(dtype), m, n, k))


@pytest.mark.parametrize("tile", (64, 128, 256))
@pytest.mark.parametrize("splits", (1, 2, 4, 8))
@pytest.mark.parametrize("sets", (2, 3))
def test_every_tile_and_split(rt, monkeypatch, tile, splits, sets):
    """Each forced configuration (token tile, K splits, A register sets) gives the reference's numbers, runs the
    split it was asked for, and never writes outside its [M, N] (the output is a window of a NaN-poisoned buffer)."""
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", f"tile={tile},splits={splits},sets={sets}")
    assert rt.load().gemm_wgmma_tile(100) == tile
    gen = torch.Generator().manual_seed(_seed("cfg", tile, splits))
    m, n, k, g = 100, 384, 4096, 64
    qw, s, sz = make_layer(n, k, g, torch.float16, gen)
    x = torch.randn(m, k, generator=gen).half().cuda()
    b = torch.randn(n, generator=gen).half().cuda()
    buf = torch.full(((m + 8) * n,), float("nan"), dtype=torch.float16, device="cuda")
    out, got = _run(rt, x, qw, s, sz, g, b, out=buf[: m * n].view(m, n))
    assert got == splits
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isnan(buf[m * n:]).all()), "rows past M were written"
    assert rel_err(out, reference(x, qw, s, sz, g, b)) < TOL[torch.float16]


@pytest.mark.parametrize("tile", (64, 128, 256))
@pytest.mark.parametrize("splits", (2, 4, 8))
def test_global_split_equals_cluster_split(rt, monkeypatch, tile, splits):
    """gsplit=1 (the K splits' partials meet in global memory, the last CTA of a tile sums them) gives the same bits
    as the cluster's split over shared memory (both sum the splits in order), writes nothing outside [M, N], and
    leaves its counters ready for the next launch (a second call gives the same bits)."""
    gen = torch.Generator().manual_seed(_seed("gsplit", tile, splits))
    m, n, k, g = 100, 384, 4096, 64
    qw, s, sz = make_layer(n, k, g, torch.float16, gen)
    x = torch.randn(m, k, generator=gen).half().cuda()
    b = torch.randn(n, generator=gen).half().cuda()
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", f"tile={tile},splits={splits}")
    cluster, got = _run(rt, x, qw, s, sz, g, b)
    assert got == splits
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", f"tile={tile},splits={splits},gsplit=1")
    for _ in range(2):
        buf = torch.full(((m + 8) * n,), float("nan"), dtype=torch.float16, device="cuda")
        out, got = _run(rt, x, qw, s, sz, g, b, out=buf[: m * n].view(m, n))
        assert got == splits
        assert bool(torch.isnan(buf[m * n:]).all()), "rows past M were written"
        assert torch.equal(out.view(torch.int16), cluster.view(torch.int16))


def test_global_split_in_graph(rt, monkeypatch):
    """The split-K workspace made on a stream's first use inside a CUDA-graph capture (allocated and zeroed outside
    the graph): replays give the eager bits, and so does an eager call on that stream afterwards."""
    gen = torch.Generator().manual_seed(_seed("gsplit-graph"))
    m, n, k, g = 64, 512, 4096, 128
    qw, s, sz = make_layer(n, k, g, torch.float16, gen)
    x = torch.randn(m, k, generator=gen).half().cuda()
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", "tile=64,splits=4,gsplit=1")
    want, _ = _run(rt, x, qw, s, sz, g)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        rt.load().gemm_wgmma(x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(), m, n, k, g,
                             "float16", stream.cuda_stream)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    out.fill_(float("nan"))
    torch.cuda.synchronize()   # the fill (default stream) before the call on `stream`
    with torch.cuda.stream(stream):
        rt.load().gemm_wgmma(x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(), m, n, k, g,
                             "float16", stream.cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("splits", (1, 4))
def test_rotated_k_loop(rt, monkeypatch, splits):
    """rot=1 (each channel tile starts its k loop at its own stage and wraps around) sums the same products in
    another order: the reference's numbers, with the wrap inside each split."""
    gen = torch.Generator().manual_seed(_seed("rot", splits))
    m, n, k, g = 70, 640, 4096, 128
    qw, s, sz = make_layer(n, k, g, torch.float16, gen)
    x = torch.randn(m, k, generator=gen).half().cuda()
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", f"tile=64,splits={splits}")
    plain, _ = _run(rt, x, qw, s, sz, g)
    monkeypatch.setenv("DCC_W4A16_WGMMA_CFG", f"tile=64,splits={splits},rot=1")
    out, got = _run(rt, x, qw, s, sz, g)
    assert got == splits
    assert rel_err(out, reference(x, qw, s, sz, g)) < TOL[torch.float16]
    assert not torch.equal(out, plain), "the rotated loop should sum in another order"


def test_deterministic(rt):
    gen = torch.Generator().manual_seed(3)
    qw, s, sz = make_layer(1024, 8192, 128, torch.bfloat16, gen)
    x = torch.randn(64, 8192, generator=gen).bfloat16().cuda()
    a, sa = _run(rt, x, qw, s, sz, 128)
    b, sb = _run(rt, x, qw, s, sz, 128)
    assert sa == sb and sa > 1, "a layer of 8 tiles should be split over K"
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_token_tile_by_waves(rt):
    """The token tile: 64 to M = 64, 128 above, and 256 past M = 128 where 128-token tiles would take a second wave of
    SMs and 256-token tiles fit in one (N = 128 x SMs at M = 256: 2 x SMs tiles of 128 against SMs of 256)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ext = rt.load()
    assert ext.gemm_wgmma_tile(64, 128 * sms) == 64 and ext.gemm_wgmma_tile(128, 128 * sms) == 128
    assert ext.gemm_wgmma_tile(256, 128 * sms) == 256 and ext.gemm_wgmma_tile(200, 128 * sms) == 256
    assert ext.gemm_wgmma_tile(256, 128 * (sms // 2)) == 128     # both fit in one wave: the 128-token tiles
    assert ext.gemm_wgmma_tile(512, 128 * sms) == 128            # neither fits in one wave
    assert ext.gemm_wgmma_tile(256) == 128                       # no N: by M alone
    check_linear(rt, 256, 128 * sms, 512, 128, torch.float16, "wgmma", seed=_seed("tile256", sms))


def test_auto_dispatch(rt, monkeypatch):
    """Inside the M range, path="auto" runs the wgmma GEMM (the same bits as path="wgmma")."""
    from dcc.runtime.cuda import ops

    monkeypatch.setattr(ops, "WGMMA_M", (16, 256))
    gen = torch.Generator().manual_seed(5)
    qw, s, sz = make_layer(512, 1024, 128, torch.float16, gen)
    x = torch.randn(40, 1024, generator=gen).half().cuda()
    auto = rt.w4a16_linear(x, qw, s, sz, 128)
    wg = rt.w4a16_linear(x, qw, s, sz, 128, path="wgmma")
    assert torch.equal(auto.view(torch.int16), wg.view(torch.int16))
    assert rel_err(auto, reference(x, qw, s, sz, 128)) < TOL[torch.float16]


def test_rejects_unsupported_shapes(rt):
    gen = torch.Generator().manual_seed(9)
    qw, s, sz = make_layer(192, 256, 128, torch.float16, gen)   # N = 192: not a multiple of 128
    x = torch.randn(32, 256, device="cuda", dtype=torch.float16)
    assert not rt.load().gemm_wgmma_supported(32, 192, 256, 128)
    with pytest.raises(ValueError, match="N % 128"):
        rt.w4a16_linear(x, qw, s, sz, 128, path="wgmma")
