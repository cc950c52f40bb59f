"""GPU tests of csrc/attn (module dcc_attn_ext, the fast decoder's kernels) against their torch versions
(dcc/runtime/fastlm/ref_ops.py): the decode step's RoPE and KV4 write give the codes, scales and zeros of dcc's
quant_kv bit for bit; decode attention equals softmax attention over the cache (KV4 dequantized, or 16-bit; one or
several splits, GQA groups 1 to 8, head_dim 8 to 256); residual + RMSNorm and SiLU-mul agree to an fp16 rounding."""
import pytest
import torch

from dcc.runtime.fastlm import ops, ref_ops
from cuda_util import require_family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ext():
    require_family("attn")
    return ops._ext()


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _tables(t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(t, d // 2, generator=g) * 6.3
    ang = torch.cat([ang, ang], -1)
    return ang.cos().cuda().contiguous(), ang.sin().cuda().contiguous()


@pytest.mark.parametrize("kv4", [1, 0])
@pytest.mark.parametrize("b,h,kvh,d", [(3, 4, 2, 8), (2, 32, 8, 128), (1, 6, 2, 64), (2, 4, 1, 256)])
def test_rope_write_is_torch_rope_then_quant_kv(ext, kv4, b, h, kvh, d):
    t = 40
    g = torch.Generator().manual_seed(d + kv4)
    qkv = (torch.randn(b, (h + 2 * kvh) * d, generator=g) * 3).half().cuda()
    qkv[0, (h + kvh) * d:(h + kvh + 1) * d] = 1.5        # a flat V vector
    pos = torch.randint(0, t, (b,), generator=g).cuda()
    cos, sin = _tables(t, d)
    q = torch.empty(b, h, d, dtype=torch.float32 if kv4 else torch.float16, device="cuda")
    if kv4:
        kc, vc = (torch.zeros(b, kvh, t, d // 2, dtype=torch.uint8, device="cuda") for _ in range(2))
        ks, kz, vs, vz = (torch.zeros(b, kvh, t, dtype=torch.float16, device="cuda") for _ in range(4))
        ptrs = (kc.data_ptr(), ks.data_ptr(), kz.data_ptr(), vc.data_ptr(), vs.data_ptr(), vz.data_ptr())
    else:
        kc, vc = (torch.zeros(b, kvh, t, d, dtype=torch.float16, device="cuda") for _ in range(2))
        ptrs = (kc.data_ptr(), 0, 0, vc.data_ptr(), 0, 0)
    ext.rope_write(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), q.data_ptr(), *ptrs,
                   b, h, kvh, d, t, 0, 2 if kv4 else 0, kv4, _stream())
    torch.cuda.synchronize()
    x = qkv.cpu().float()
    c, s = cos.cpu()[pos.cpu()][:, None], sin.cpu()[pos.cpu()][:, None]
    wq = ref_ops.rope(x[:, :h * d].reshape(b, h, d), c, s)
    wk = ref_ops.rope(x[:, h * d:(h + kvh) * d].reshape(b, kvh, d), c, s)
    wv = x[:, (h + kvh) * d:].reshape(b, kvh, d)
    assert torch.equal(q.cpu().float(), wq if kv4 else wq.half().float())
    rows = torch.arange(b)
    for want, code, sc, ze in ((wk, kc, None if not kv4 else ks, None if not kv4 else kz),
                               (wv, vc, None if not kv4 else vs, None if not kv4 else vz)):
        got = code.cpu()[rows, :, pos.cpu()]
        if not kv4:
            assert torch.equal(got, want.half())
            continue
        wc, wsc, wz = ref_ops.kv4_quantize(want)
        assert torch.equal(got, ref_ops.kv4_pack(wc))
        assert torch.equal(sc.cpu()[rows, :, pos.cpu()].view(torch.int16), wsc.view(torch.int16))
        assert torch.equal(ze.cpu()[rows, :, pos.cpu()].view(torch.int16), wz.view(torch.int16))


@pytest.mark.parametrize("kv", [4, 0, 1], ids=["kv4", "fp16", "bf16"])
@pytest.mark.parametrize("chunk", [256, 32])
@pytest.mark.parametrize("b,h,kvh,d,t", [(2, 8, 4, 8, 70), (3, 32, 8, 128, 300), (1, 12, 4, 64, 513),
                                         (2, 8, 8, 128, 64), (1, 16, 2, 256, 100), (4, 2, 2, 16, 1)])
def test_decode_attention_is_attention_over_the_cache(ext, kv, chunk, b, h, kvh, d, t):
    """KV4: over the dequantized cache; 16-bit: over the cache's values. One split or several (merged)."""
    g = torch.Generator().manual_seed(h * d + t)
    k, v = torch.randn(b, kvh, t, d, generator=g) * 2, torch.randn(b, kvh, t, d, generator=g)
    dev = lambda x: x.cuda().contiguous()  # noqa: E731
    if kv == 4:
        kq, vq = ref_ops.kv4_quantize(k), ref_ops.kv4_quantize(v)
        tens = [dev(ref_ops.kv4_pack(kq[0])), dev(kq[1]), dev(kq[2]), dev(ref_ops.kv4_pack(vq[0])), dev(vq[1]),
                dev(vq[2])]
        kd = ref_ops.kv4_dequantize(*(x.cpu() for x in tens[:3]))
        vd = ref_ops.kv4_dequantize(*(x.cpu() for x in tens[3:]))
        ptrs = [x.data_ptr() for x in tens]
    else:
        dt = torch.float16 if kv == 0 else torch.bfloat16
        tens = [dev(k.to(dt)), dev(v.to(dt))]
        kd, vd = tens[0].cpu().float(), tens[1].cpu().float()
        ptrs = [tens[0].data_ptr(), 0, 0, tens[1].data_ptr(), 0, 0]
    q = torch.randn(b, h, d, generator=g).cuda()
    pos = torch.randint(0, t, (b,), generator=g)
    pos[0] = t - 1                                       # one sequence uses every slot
    nsplit = -(-t // chunk)
    ws = torch.zeros(b * h * nsplit * (d + 2) + b * kvh, dtype=torch.float32, device="cuda")
    out = torch.full((b, h, d), float("nan"), dtype=torch.float16, device="cuda")
    ext.decode_attention(q.data_ptr(), 0, 0, 0, 0, 0, *ptrs, pos.cuda().data_ptr(), out.data_ptr(), ws.data_ptr(),
                         b, h, kvh, d, t, chunk, nsplit, kv, 0, _stream())
    torch.cuda.synchronize()
    counters = ws[b * h * nsplit * (d + 2):].view(torch.int32)
    assert int(counters.abs().sum()) == 0                # the merging CTAs reset their arrival counters
    want = ref_ops.decode_attention(q.cpu().double(), kd.double(), vd.double(), pos + 1)
    err = (out.cpu().double() - want).abs().max()
    assert torch.isfinite(out).all() and float(err) <= 2e-3 * max(1.0, float(want.abs().max())), float(err)


@pytest.mark.parametrize("kv", [4, 0, 1], ids=["kv4", "fp16", "bf16"])
@pytest.mark.parametrize("b,h,kvh,d,t,chunk", [(2, 32, 8, 128, 300, 32), (3, 8, 4, 8, 40, 256), (1, 12, 4, 64, 96, 32)])
def test_fused_rope_write_attention_is_rope_write_then_attention(ext, kv, b, h, kvh, d, t, chunk):
    """The one-launch decode step (q RoPE'd in the kernel, the step's K/V written by the CTA that holds its slot)
    gives the bits of rope_write followed by decode_attention, in the output and in the cache."""
    g = torch.Generator().manual_seed(kv * 7 + d)
    in_dt = torch.bfloat16 if kv == 1 else torch.float16
    qkv = (torch.randn(b, (h + 2 * kvh) * d, generator=g) * 2).to(in_dt).cuda()
    pos = torch.randint(0, t, (b,), generator=g).cuda()
    cos, sin = _tables(t, d, seed=3)
    if kv == 4:
        cache = [torch.randint(0, 256, (b, kvh, t, d // 2), generator=g, dtype=torch.uint8).cuda(),
                 (torch.rand(b, kvh, t, generator=g) * 0.3 + 0.01).half().cuda(),
                 (torch.rand(b, kvh, t, generator=g) * 15).half().cuda()]
        cache = cache + [x.clone() for x in cache]
    else:
        cache = [torch.randn(b, kvh, t, d, generator=g).to(in_dt).cuda(), None, None]
        cache = cache + [torch.randn(b, kvh, t, d, generator=g).to(in_dt).cuda(), None, None]
    twin = [None if x is None else x.clone() for x in cache]
    ptr = lambda xs: [0 if x is None else x.data_ptr() for x in xs]  # noqa: E731
    nsplit = -(-t // chunk)
    outs = []
    for fused, cc in ((False, cache), (True, twin)):
        ws = torch.zeros(b * h * nsplit * (d + 2) + b * kvh, dtype=torch.float32, device="cuda")
        out = torch.empty(b, h, d, dtype=torch.float16, device="cuda")
        if fused:
            ext.decode_attention(0, qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), 0 if kv != 1 else 1,
                                 *ptr(cc), pos.data_ptr(), out.data_ptr(), ws.data_ptr(), b, h, kvh, d, t, chunk,
                                 nsplit, kv, 0, _stream())
        else:
            q = torch.empty(b, h, d, dtype=torch.float32, device="cuda")
            ext.rope_write(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), q.data_ptr(),
                           *ptr(cc), b, h, kvh, d, t, 0 if kv != 1 else 1, 2, int(kv == 4), _stream())
            ext.decode_attention(q.data_ptr(), 0, 0, 0, 0, 0, *ptr(cc), pos.data_ptr(), out.data_ptr(),
                                 ws.data_ptr(), b, h, kvh, d, t, chunk, nsplit, kv, 0, _stream())
        outs.append(out)
    torch.cuda.synchronize()
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    for x, y in zip(cache, twin):
        assert x is None or torch.equal(x, y)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,hd", [(1, 4096), (64, 4096), (5, 72)])
def test_add_rmsnorm_and_silu_mul_match_torch(ext, dt, m, hd):
    g = torch.Generator().manual_seed(m + hd)
    h = (torch.randn(m, hd, generator=g) * 4).cuda()
    delta, w = torch.randn(m, hd, generator=g).to(dt).cuda(), (torch.rand(hd, generator=g) + 0.5).to(dt).cuda()
    h_ref = h.clone()
    want = ref_ops.add_rmsnorm(h_ref, delta, w, 1e-5, dt)
    got = ops.add_rmsnorm(h, delta, w, 1e-5, dt)
    assert torch.equal(h, h_ref)                                   # the residual add is one float32 add
    assert torch.allclose(got.float(), want.float(), rtol=1e-2 if dt == torch.bfloat16 else 2e-3, atol=1e-3)
    gu = (torch.randn(m, 2 * hd, generator=g) * 3).to(dt).cuda()
    gate, up = gu[:, :hd], gu[:, hd:]
    got = ops.silu_mul(gate, up, dt)
    want = ref_ops.silu_mul(gate, up, dt)
    assert torch.allclose(got.float(), want.float(), rtol=1e-2 if dt == torch.bfloat16 else 2e-3, atol=1e-4)
