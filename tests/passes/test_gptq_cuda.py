"""GPU: GPTQ's column sweep replayed as CUDA graphs (dcc/passes/_gptq_graph.py) gives the eager loop's codes, scales
and zeros bit for bit, for every kind of column quantizer (integer with each zero mode, QoQ's progressive two-level,
fp4 with and without NVFP4's micro-scales), with per-channel and grouped scales and a partial last block."""
import pytest
import torch

from dcc.ir.formats import QuantSpec
from dcc.passes import gptq
from dcc.passes.gptq import GptqConfig, gptq_quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPECS = [QuantSpec("int4", symmetric=False, group_size=0, zero_mode="offset"),       # QServe per channel
         QuantSpec("int4", symmetric=False, group_size=128, progressive=True),        # QServe g128 (QoQ)
         QuantSpec("int4", symmetric=False, group_size=128, zero_mode="float"),       # TinyChat g128
         QuantSpec("int4", symmetric=False, group_size=64, zero_mode="scaled"),
         QuantSpec("int4", symmetric=False, group_size=64),
         QuantSpec("int4", symmetric=True, group_size=64),
         QuantSpec("fp4_e2m1", group_size=16, scale_dtype="bfloat16", micro_scale="fp8_e4m3"),   # NVFP4
         QuantSpec("fp4_e2m1", group_size=32, scale_dtype="bfloat16")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype}-g{s.group_size}-{s.zero_mode}"
                         + ("-progressive" if s.progressive else "") + (f"-{s.micro_scale}" if s.micro_scale else ""))
@pytest.mark.parametrize("k", [512, 576])   # 576: a last block of 64 columns runs eagerly after the graphs
def test_graphed_sweep_equals_the_eager_one(spec, k, monkeypatch):
    if spec.group_size > 0 and k % spec.group_size:
        pytest.skip("groups must divide K")
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(96, k, generator=g) * 0.05).cuda()
    x = (torch.randn(2048, k, generator=g) * torch.rand(k, generator=g) * 3).cuda()
    got = gptq_quantize(w, x, spec, GptqConfig())
    monkeypatch.setattr(gptq, "GRAPHED", False)
    want = gptq_quantize(w, x, spec, GptqConfig())
    for a, b in ((got.codes, want.codes), (got.scale, want.scale), (got.zero, want.zero),
                 (got.scale0, want.scale0)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    from dcc.passes import _gptq_graph
    assert not _gptq_graph._FAILED, "a quantizer could not be captured: the test compared eager with eager"


@pytest.mark.parametrize("k", [96, 1000])
def test_the_gpus_split_tf32_gram_is_close_to_exact(k):
    # three TF32 products of the exact split v = hi + lo: what is dropped (lo^T lo, TF32's rounding of lo) is
    # about 2^-20 of each product, so the relative error is ~1e-6 -- against ~1e-4 for one plain TF32 product
    g = torch.Generator().manual_seed(k)
    v = torch.randn(4096, k, generator=g) * torch.rand(k, generator=g) * 4
    exact = v.double().T @ v.double()
    got = gptq.gram(v.cuda()).double().cpu()
    assert float((got - exact).norm() / exact.norm()) < 1e-5
    before = torch.backends.cuda.matmul.allow_tf32
    assert torch.equal(gptq.gram(v.cuda()), gptq.gram(v.cuda()))   # the same bits every time
    assert torch.backends.cuda.matmul.allow_tf32 == before         # the setting is put back
