"""GPU test of programmatic dependent launch (csrc/common/pdl.cuh): the decode step's chain of kernels -- residual add +
RMSNorm, the three small-M W4A16 GEMV kernels (16-warp, persistent, 4-warp grids), SiLU * up, and decode attention --
launched with PDL (each may start before the one before it ends, loading weights and prefetching the cache first)
gives the bits it gives launched one after the other (DCC_PDL=0), eagerly and replayed from a CUDA graph. A kernel
that read an earlier kernel's output or wrote a buffer before its wait would read stale or half-written values."""
from __future__ import annotations

import pytest
import torch
from cuda_util import require_family

from dcc.targets.common.awq_layout import pack_qweight, pack_scales

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, I, QKV = 4096, 14336, 6144       # Llama-3-8B: hidden, intermediate, q + k + v outputs (32 + 8 + 8 heads of 128)


@pytest.fixture(scope="module")
def exts():
    from dcc.runtime import cuda
    for family in ("w4a16", "attn"):
        require_family(family)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs an sm_90 GPU (elsewhere launches are plain and there is nothing to compare)")
    from dcc.runtime.fastlm import ops
    return cuda, ops


def layer(n, k, gen):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scale = (0.002 + 0.02 * torch.rand(n, k // 128, generator=gen, dtype=torch.float64)).half()
    zero = torch.randint(0, 16, (n, k // 128), generator=gen)
    s, z = pack_scales(scale, zero, 128, torch.float16)
    return [t.cuda() for t in (pack_qweight(codes), s, z)]


def test_pdl_chain_gives_the_serial_bits(exts, monkeypatch):
    cuda, ops = exts
    from dcc.runtime.fastlm.cache import KV4Cache

    gen = torch.Generator().manual_seed(7)
    # N = 6144: 384 row tiles, the persistent grid; 2 * 14336: the 4-warp grid; 4096: one 16-warp block a tile
    w_qkv, w_gu, w_down, w_o = layer(QKV, H, gen), layer(2 * I, H, gen), layer(H, I, gen), layer(H, H, gen)
    norm_w = (1 + 0.1 * torch.randn(H, generator=gen)).half().cuda()
    h0 = torch.randn(1, H, generator=gen).cuda()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cache = KV4Cache(1, 1, 8, 384, 128, 32, torch.device("cuda"), sms)   # 256 slots of random codes in use
    cache.kc.random_(0, 256)
    cache.vc.random_(0, 256)
    for t in (cache.ks, cache.vs):
        t.uniform_(0.01, 0.1)
    for t in (cache.kz, cache.vz):
        t.uniform_(0, 15)
    ang = torch.arange(384)[:, None] * torch.rand(1, 128, generator=gen)   # any angles: only the bits are compared
    cos, sin = ang.cos().cuda(), ang.sin().cuda()
    pos = torch.tensor([255], device="cuda")
    lin = lambda x, w: cuda.w4a16_linear(x, *w, 128)   # noqa: E731

    def chain():
        h = h0.clone()
        x = ops.add_rmsnorm(h, None, norm_w, 1e-5, torch.float16)
        qkv = lin(x, w_qkv)
        o = cache.decode(0, qkv, pos, cos, sin).reshape(1, H)
        delta = lin(o, w_o)
        x = ops.add_rmsnorm(h, delta, norm_w, 1e-5, torch.float16)
        gu = lin(x, w_gu)
        act = ops.silu_mul(gu[:, :I], gu[:, I:], torch.float16)
        delta = lin(act, w_down)
        return torch.cat([ops.add_rmsnorm(h, delta, norm_w, 1e-5, torch.float16).float(), h], -1)

    def run(pdl: str, graph: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("DCC_PDL", pdl)   # read at every launch
        if not graph:
            return [chain().cpu() for _ in range(3)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain()
        outs = []
        for _ in range(3):
            g.replay()
            outs.append(out.cpu())
        return outs

    want = run("0", False)[0]
    assert torch.isfinite(want).all()
    bad = [f"DCC_PDL={pdl} graph={graph} run {i}: max diff {float((got - want).abs().max())}"
           for pdl, graph in (("0", True), ("1", False), ("1", True)) for i, got in enumerate(run(pdl, graph))
           if not torch.equal(got, want)]
    assert not bad, "; ".join(bad)
