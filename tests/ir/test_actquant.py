"""Run-time quantization as QServe's kernels compute it: int8 per-token activations (scale, codes, sum) and the
4-bit KV cache (scale, fractional zero, saturating round), checked against the rules written out element by element."""
import pytest
import torch

from dcc.ir.actquant import fake_quantize_kv, fake_quantize_tokens_int8, quantize_tokens_int8


def test_int8_tokens_rules():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 1.0]).view(5, 1)
    x[4] = 0.0
    q = quantize_tokens_int8(x)
    x16 = x.half().float()
    for t in range(4):
        amax = float(x16[t].abs().max())
        assert q.scale[t, 0] == torch.tensor(amax / 127).half()
        # the kernel multiplies by 127/amax in float32 and rounds half to even
        want = torch.round(x16[t] * torch.tensor(127.0 / amax, dtype=torch.float32))
        assert torch.equal(q.codes[t], want)
        assert int(q.codes[t].abs().max()) == 127          # the largest element maps to +-127
        assert q.sum[t, 0] == x16[t].sum().half()
    assert torch.equal(q.codes[4], torch.zeros(64)) and float(q.scale[4]) == 0.0
    deq = fake_quantize_tokens_int8(x)
    rel = ((deq - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-30))[:4]
    assert bool((rel < 0.01).all()) and bool((rel > 0).all())


def test_int8_codes_are_integers_in_range():
    x = torch.randn(3, 7, 100) * 5
    q = quantize_tokens_int8(x)
    assert q.codes.shape == x.shape and q.scale.shape == (3, 7, 1)
    assert torch.equal(q.codes, torch.round(q.codes)) and int(q.codes.abs().max()) <= 127


def test_kv4_rules():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 10, 64, generator=g) * 3 + 0.5       # [B, kv_heads, T, head_dim]
    out = fake_quantize_kv(k, 4)
    x16 = k.half().float()
    lo, hi = x16.amin(-1, keepdim=True), x16.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).half().float()
    zero = (-15 * lo / (hi - lo)).half().float()
    q = torch.round(x16 * (1 / scale) + zero).clamp(0, 15)
    assert torch.equal(out, ((q - zero) * scale).half().float())
    # at most 16 distinct values per (token, head), and the error is below one step
    assert max(len(torch.unique(out[b, h, t])) for b in range(2) for h in range(3) for t in range(10)) <= 16
    assert bool(((out - k).abs() <= scale * 0.51 + 1e-2).all())


def test_kv_constant_vector_and_bits():
    v = torch.full((1, 1, 2, 8), 0.25)
    assert torch.equal(fake_quantize_kv(v, 4), v)          # no range: returned as is
    x = torch.randn(1, 1, 4, 64)
    e4 = float((fake_quantize_kv(x, 4) - x).norm())
    e8 = float((fake_quantize_kv(x, 8) - x).norm())
    assert e8 < e4 / 8
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_kv(x, 3)
