"""GPU tests of the W4A16 GEMV that ends in the decoder's residual add + RMSNorm (csrc/w4a16/gemv_norm.cu, through
dcc.runtime.cuda.ops.w4a16_linear_add_rmsnorm): the same bits as w4a16_linear followed by the fast decoder's
add_rmsnorm (csrc/attn), for the residual and the normalized rows, its counter left at zero, and the same inside a
CUDA graph; the shapes it declines."""
from __future__ import annotations

import pytest
import torch

from runtime.test_cuda_w4a16 import _seed, make_layer, require_runtime

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def rt():
    from cuda_util import require_family
    require_family("attn")
    return require_runtime()


def _two_ops(rt, x, qw, s, sz, g, h, w, eps):
    from dcc.runtime.fastlm import ops
    delta = rt.w4a16_linear(x, qw, s, sz, g)
    return ops.add_rmsnorm(h, delta, w, eps, x.dtype)


def _case(n, k, m, dtype, g, seed):
    gen = torch.Generator().manual_seed(seed)
    qw, s, sz = make_layer(n, k, g, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    h = (4 * torch.randn(m, n, generator=gen)).cuda()
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).cuda()
    return qw, s, sz, x, h, w


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,g", [(1, 4096, 4096, 128), (3, 4096, 14336, 128), (8, 1024, 512, 64),
                                     (2, 2048, 4096, 32), (1, 128, 128, 128)])
def test_same_bits_as_the_two_ops(rt, dtype, m, n, k, g):
    from dcc.runtime.cuda.ops import w4a16_linear_add_rmsnorm
    qw, s, sz, x, h, w = _case(n, k, m, dtype, g, _seed("norm", str(dtype), m, n, k, g))
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    h_ref = h.clone()
    want = _two_ops(rt, x, qw, s, sz, g, h_ref, w, 1e-5)
    for _ in range(2):   # the second call finds the counter the first one left
        h_got = h.clone()
        got = w4a16_linear_add_rmsnorm(x, qw, s, sz, g, h_got, w, 1e-5, counter)
        torch.cuda.synchronize()
        assert got is not None, "the kernel should take this shape"
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert torch.equal(h_got, h_ref)
        assert int(counter.item()) == 0


def test_same_bits_in_a_cuda_graph(rt):
    from dcc.runtime.cuda.ops import w4a16_linear_add_rmsnorm
    qw, s, sz, x, h, w = _case(4096, 4096, 2, torch.float16, 128, _seed("norm-graph"))
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    h_ref = h.clone()
    want = _two_ops(rt, x, qw, s, sz, 128, h_ref, w, 1e-6)
    h_live = h.clone()
    w4a16_linear_add_rmsnorm(x, qw, s, sz, 128, h_live, w, 1e-6, counter)   # warm-up: h_live moves one step on
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear_add_rmsnorm(x, qw, s, sz, 128, h_live, w, 1e-6, counter)
    for _ in range(3):
        h_live.copy_(h)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)) and torch.equal(h_live, h_ref)
    assert int(counter.item()) == 0


def test_declines_what_it_does_not_take(rt):
    """M > 8, a row wider than the registers hold, a residual of another shape or dtype: None (the caller runs the
    two ops), nothing launched."""
    from dcc.runtime.cuda.ops import w4a16_linear_add_rmsnorm
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    qw, s, sz, x, h, w = _case(256, 256, 9, torch.float16, 128, 1)
    assert w4a16_linear_add_rmsnorm(x, qw, s, sz, 128, h, w, 1e-5, counter) is None          # M = 9
    qw, s, sz, x, h, w = _case(256, 256, 2, torch.float16, 128, 2)
    assert w4a16_linear_add_rmsnorm(x, qw, s, sz, 128, h.half(), w, 1e-5, counter) is None   # 16-bit residual
    assert w4a16_linear_add_rmsnorm(x, qw, s, sz, 128, h[:1], w, 1e-5, counter) is None      # one row short
    assert not rt.load().gemv_add_rmsnorm_fits(1, 16384, 4096, "float16")                    # > 8192 wide
