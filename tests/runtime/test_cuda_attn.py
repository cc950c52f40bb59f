"""GPU tests of csrc/attn (module dcc_attn_ext, the fast decoder's kernels) against their torch versions
(dcc/runtime/fastlm/ref_ops.py): the decode step's RoPE and KV4 write give the codes, scales and zeros of dcc's
quant_kv bit for bit; decode attention equals softmax attention over the cache (KV4 dequantized, or 16-bit; one or
several splits, GQA groups 1 to 8, head_dim 8 to 256); residual + RMSNorm and SiLU-mul agree to an fp16 rounding; a
prefill's RoPE + cache write (rope_write_rows) gives the torch path's q, cache and KV4 read-back bit for bit."""
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
    if nsplit > 1:   # the merge reads the partials with 16-byte loads: a misaligned workspace is refused
        with pytest.raises(RuntimeError, match="decode_attention"):
            ext.decode_attention(q.data_ptr(), 0, 0, 0, 0, 0, *ptrs, pos.cuda().data_ptr(), out.data_ptr(),
                                 ws.data_ptr() + 4, b, h, kvh, d, t, chunk, nsplit, kv, 0, _stream())
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


def _prefill_tables(t, d, seed):
    """RoPE tables whose position 0 is angle 0 (cos 1, sin 0), as a model's: a flat K vector there stays flat."""
    cos, sin = _tables(t, d, seed)
    cos[0], sin[0] = 1.0, 0.0
    return cos, sin


def _prefill_reference(qkv, cos, sin, b, s, h, kvh, d):
    """The torch path of a prefill's RoPE on the rows qkv [B * S, >= (H + 2 KVH) D]: (q [B * S, H, D], k, v
    [B, KVH, S, D]) in float32 (v as given), evaluated where qkv lives."""
    x = qkv.float()
    c, sn = cos[:s][None, :, None], sin[:s][None, :, None]
    q = ref_ops.rope(x[:, :h * d].reshape(b, s, h, d), c, sn).reshape(b * s, h, d)
    k = ref_ops.rope(x[:, h * d:(h + kvh) * d].reshape(b, s, kvh, d), c, sn).transpose(1, 2)
    v = x[:, (h + kvh) * d:(h + 2 * kvh) * d].reshape(b, s, kvh, d).transpose(1, 2)
    return q, k, v


def _bits(x):
    """16-bit values as their bit patterns (torch.equal on them tells -0 from 0)."""
    return x.view(torch.int16) if x.element_size() == 2 else x


def _run_rows(ext, qkv, cos, sin, cache, deq, b, s, h, kvh, d, t, q_dt, kv4):
    q = torch.full((b * s, h, d), float("nan"), dtype=q_dt, device="cuda")
    ptrs = [0 if x is None else x.data_ptr() for x in cache]
    dptr = (0, 0) if deq is None else (deq[0].data_ptr(), deq[1].data_ptr())
    ext.rope_write_rows(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), *ptrs, *dptr, b,
                        s, h, kvh, d, t, ops._DT[qkv.dtype], ops._DT[q_dt], kv4, _stream())
    return q


@pytest.mark.parametrize("kv4", [1, 0], ids=["kv4", "kv16"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,s", [(1, 1), (3, 1), (1, 7), (3, 7), (1, 130), (3, 130)])
@pytest.mark.parametrize("d", [64, 128])
def test_rope_write_rows_is_the_torch_prefill(ext, kv4, dt, b, s, d):
    """A prefill's rows (sequence-major, row r at position r % S of sequence r / S; a row stride wider than the row):
    q out, cache slots 0..S-1 and, for KV4, the read-back K/V are the torch path's bit for bit -- ref_ops.rope, then
    the cast (16-bit cache) or kv4_quantize + kv4_pack, and kv4_dequantize in fp16 -- with a flat K and a flat V
    vector; slots S.. keep what they held. GQA 8 query heads over 2 KV heads."""
    h, kvh, t = 8, 2, 140
    g = torch.Generator().manual_seed(1000 * kv4 + 10 * s + b + d)
    width = (h + 2 * kvh) * d
    qkv = (torch.randn(b * s, width + 24, generator=g) * 3).to(dt)
    qkv[0, h * d:(h + 1) * d] = 1.5                          # flat K: row 0 is position 0 (cos 1, sin 0)
    qkv[-1, (h + kvh + 1) * d:(h + 2 * kvh) * d] = -0.75     # flat V: the last KV head of the last row
    qkv = qkv.cuda()
    cos, sin = _prefill_tables(t, d, seed=d)
    if kv4:
        cache = [torch.randint(0, 256, (b, kvh, t, d // 2), generator=g, dtype=torch.uint8),
                 (torch.rand(b, kvh, t, generator=g) + 0.1).half(), (torch.rand(b, kvh, t, generator=g) * 15).half()]
        cache = [x.cuda() for x in cache + [x.clone() for x in cache]]
        deq = [torch.full((b, kvh, s, d), float("nan"), dtype=torch.float16, device="cuda") for _ in range(2)]
    else:
        cache = [torch.randn(b, kvh, t, d, generator=g).to(dt).cuda(), None, None]
        cache = cache + [torch.randn(b, kvh, t, d, generator=g).to(dt).cuda(), None, None]
        deq = None
    want = [None if x is None else x.cpu().clone() for x in cache]
    q_dt = torch.float16 if kv4 else dt                      # what the prefill's SDPA takes
    q = _run_rows(ext, qkv, cos, sin, cache, deq, b, s, h, kvh, d, t, q_dt, kv4)
    torch.cuda.synchronize()

    wq, wk, wv = _prefill_reference(qkv.cpu(), cos.cpu(), sin.cpu(), b, s, h, kvh, d)
    assert torch.equal(_bits(q.cpu()), _bits(wq.to(q_dt)))
    for x, i in ((wk, 0), (wv, 3)):
        if not kv4:
            want[i][:, :, :s] = x.to(dt)
            continue
        codes, scale, zero = ref_ops.kv4_quantize(x)
        want[i][:, :, :s], want[i + 1][:, :, :s], want[i + 2][:, :, :s] = ref_ops.kv4_pack(codes), scale, zero
        wd = ref_ops.kv4_dequantize(want[i][:, :, :s], scale, zero).half()
        assert torch.equal(_bits(deq[i // 3].cpu()), _bits(wd))
    for got, w in zip(cache, want):
        assert got is None or torch.equal(_bits(got.cpu()), _bits(w))
    if kv4:   # the flat vectors were flat: code 0, scale 1, zero -value
        assert float(want[1][0, 0, 0]) == 1.0 and float(want[2][0, 0, 0]) == -1.5
        assert float(want[4][-1, -1, s - 1]) == 1.0 and float(want[5][-1, -1, s - 1]) == 0.75


@pytest.mark.parametrize("kv4", [1, 0], ids=["kv4", "kv16"])
def test_rope_write_rows_covers_a_64_by_2048_prefill(ext, kv4):
    """The grid reaches every row of the largest prefill the issue names (64 x 2048 rows, 48 heads of 64: 393,216
    blocks); compared against the torch path on the GPU (the same float32 operations, so the same bits)."""
    b, s, h, kvh, d = 64, 2048, 32, 8, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(b * s, (h + 2 * kvh) * d, generator=g, device="cuda").half()
    cos, sin = _prefill_tables(s, d, seed=7)
    if kv4:
        cache = [torch.zeros(b, kvh, s, d // 2, dtype=torch.uint8, device="cuda")]
        cache += [torch.zeros(b, kvh, s, dtype=torch.float16, device="cuda") for _ in range(2)]
        cache += [x.clone() for x in cache]
        deq = [torch.empty(b, kvh, s, d, dtype=torch.float16, device="cuda") for _ in range(2)]
    else:
        cache = [torch.zeros(b, kvh, s, d, dtype=torch.float16, device="cuda"), None, None]
        cache += [cache[0].clone(), None, None]
        deq = None
    q = _run_rows(ext, qkv, cos, sin, cache, deq, b, s, h, kvh, d, s, torch.float16, kv4)
    wq, wk, wv = _prefill_reference(qkv, cos, sin, b, s, h, kvh, d)
    assert torch.equal(_bits(q), _bits(wq.half()))
    del wq
    for x, i in ((wk, 0), (wv, 3)):
        if not kv4:
            assert torch.equal(_bits(cache[i]), _bits(x.half()))
            continue
        codes, scale, zero = ref_ops.kv4_quantize(x)
        assert torch.equal(cache[i], ref_ops.kv4_pack(codes))
        assert torch.equal(_bits(cache[i + 1]), _bits(scale)) and torch.equal(_bits(cache[i + 2]), _bits(zero))
        assert torch.equal(_bits(deq[i // 3]), _bits(ref_ops.kv4_dequantize(cache[i], scale, zero).half()))


def test_rope_write_rows_refuses_what_it_cannot_take(ext):
    """S beyond the cache's T, and read-back outputs for a 16-bit cache, are errors, not out-of-bounds writes."""
    qkv = torch.zeros(4, 12 * 8, dtype=torch.float16, device="cuda")
    cos, sin = _prefill_tables(4, 8, seed=0)
    kc, vc = (torch.zeros(1, 2, 3, 8, dtype=torch.float16, device="cuda") for _ in range(2))
    q = torch.empty(4, 8, 8, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="rope_write_rows"):   # S = 4 > T = 3
        ext.rope_write_rows(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), q.data_ptr(), kc.data_ptr(),
                            0, 0, vc.data_ptr(), 0, 0, 0, 0, 1, 4, 8, 2, 8, 3, 0, 0, 0, _stream())
    with pytest.raises(RuntimeError, match="rope_write_rows"):   # kd/vd with a 16-bit cache
        ext.rope_write_rows(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), q.data_ptr(), kc.data_ptr(),
                            0, 0, vc.data_ptr(), 0, 0, q.data_ptr(), q.data_ptr(), 1, 2, 8, 2, 8, 3, 0, 0, 0, _stream())
