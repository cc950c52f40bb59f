"""The fast decoder's caches on the CPU (dcc/runtime/fastlm/cache.py), the logic around the prefill's one-launch RoPE +
cache write (csrc/attn rope_write_rows; its numerics are tests/runtime/test_cuda_attn.py's): the torch path writes
the RoPE'd K/V as before (16-bit cast, or KV4 = dcc's quant_kv); q, k, v that are adjacent column blocks of one GEMM
output are read in place, others concatenated; the kernel is chosen by the decode step's rule and called with the
binding's argument order (a stand-in extension records the call)."""
import pytest
import torch

from dcc.ir.actquant import fake_quantize_kv
from dcc.runtime.fastlm import cache as cache_mod
from dcc.runtime.fastlm import ops, ref_ops
from dcc.runtime.fastlm.cache import KV4Cache, KV16Cache, qkv_rows

H, KVH, D = 8, 2, 16


def _rows(b, s, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(b * s, (H + 2 * KVH) * D, generator=g) * 2).to(dtype)
    return out, torch.split(out, [H * D, KVH * D, KVH * D], -1)


def _tables(t):
    ang = torch.rand(t, D // 2, generator=torch.Generator().manual_seed(1)) * 6.3
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def test_qkv_rows_reads_a_fused_gemm_output_in_place_and_concatenates_otherwise():
    out, (q, k, v) = _rows(3, 5)
    rows, stride = qkv_rows(q, k, v)
    assert rows.data_ptr() == out.data_ptr() and stride == out.shape[1] and torch.equal(rows, out)
    padded = torch.randn(15, out.shape[1] + 8)               # a wider row (padding after v): still in place
    q, k, v = torch.split(padded[:, :out.shape[1]], [H * D, KVH * D, KVH * D], -1)
    rows, stride = qkv_rows(q, k, v)
    assert rows.data_ptr() == padded.data_ptr() and stride == padded.shape[1] and torch.equal(rows, padded[:, :-8])
    for qkv in ((q.clone(), k.clone(), v.clone()), (q, v, k)):   # separate tensors; the right blocks, wrong order
        rows, stride = qkv_rows(*qkv)
        assert rows.is_contiguous() and stride == out.shape[1] and torch.equal(rows, torch.cat(qkv, -1))


@pytest.mark.parametrize("kind", ["kv4", "kv16"])
def test_the_torch_prefill_writes_the_roped_kv_and_attends_to_it(kind):
    """prefill_rows' torch path = RoPE (ref_ops.rope at positions 0..S-1 of every sequence) then prefill(): slots
    0..S-1 hold the RoPE'd K and V (16-bit: cast; KV4: read back as fake_quantize_kv), the rest stay zero."""
    b, s, cap = 2, 6, 9
    _, (q, k, v) = _rows(b, s)
    cos, sin = _tables(cap)
    c = KV4Cache(1, b, KVH, cap, D, H, "cpu") if kind == "kv4" else KV16Cache(1, b, KVH, cap, D, H, "cpu",
                                                                               torch.float32)
    o = c.prefill_rows(0, q, k, v, b, cos, sin)
    assert o.shape == (b, H, s, D)
    cs, sn = cos[:s][None, :, None], sin[:s][None, :, None]
    wk = ref_ops.rope(k.reshape(b, s, KVH, D), cs, sn).transpose(1, 2)
    wv = v.reshape(b, s, KVH, D).transpose(1, 2)
    kk, vv = c.dequantized(0) if kind == "kv4" else (c.k[0], c.v[0])
    if kind == "kv4":
        wk, wv = fake_quantize_kv(wk, 4), fake_quantize_kv(wv, 4)
    assert torch.equal(kk[:, :, :s], wk) and torch.equal(vv[:, :, :s], wv)
    if kind == "kv16":
        assert not kk[:, :, s:].any() and not vv[:, :, s:].any()
    wq = ref_ops.rope(q.reshape(b, s, H, D), cs, sn).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(wq, kk[:, :, :s], vv[:, :, :s], is_causal=True,
                                                             enable_gqa=True)
    assert torch.allclose(o, want, rtol=0, atol=1e-6)


class _FakeExt:
    """Records rope_write_rows' arguments (the binding's order: qkv, stride, cos, sin, q_out, kc, ks, kz, vc, vs, vz,
    kd, vd, B, S, H, KVH, D, T, in_dt, q_dt, kv4, stream)."""

    def __init__(self):
        self.calls = []

    def rope_write_rows(self, *args):
        assert len(args) == 23
        self.calls.append(args)


@pytest.fixture
def fake_ext(monkeypatch):
    ext = _FakeExt()
    monkeypatch.setattr(ops, "_ext", lambda name="attn": ext)
    monkeypatch.setattr(ops, "_stream", lambda t: 77)
    return ext


def _kernel_cache(kind, dtype=torch.float16, cap=9, b=2):
    """A CPU cache that takes the kernel path (kernels and the prefill kernel forced on; its attention returns q,
    unrun)."""
    c = KV4Cache(1, b, KVH, cap, D, H, "cpu") if kind == "kv4" else KV16Cache(1, b, KVH, cap, D, H, "cpu", dtype)
    c.kernels = c.prefill_kernel = True
    c._causal = lambda q, k, v, dt: (q, k, v, dt)
    return c


@pytest.mark.parametrize("kind", ["kv4", "kv16"])
def test_the_prefill_kernel_is_called_with_the_bindings_arguments(fake_ext, kind):
    b, s, cap = 2, 6, 9
    out, (q, k, v) = _rows(b, s, torch.bfloat16)
    cos, sin = _tables(cap)
    c = _kernel_cache(kind, torch.bfloat16, cap, b)
    qo, kk, vv, dt = c.prefill_rows(0, q, k, v, b, cos, sin)
    (args,) = fake_ext.calls
    assert args[0] == out.data_ptr() and args[1] == out.shape[1] and args[2:4] == (cos.data_ptr(), sin.data_ptr())
    assert args[4] == qo.data_ptr() and qo.shape == (b, H, s, D)
    assert qo.transpose(1, 2).is_contiguous()                # the kernel's [B * S, H, D] rows
    assert args[13:] == (b, s, H, KVH, D, cap, ops._DT[torch.bfloat16], ops._DT[dt], int(kind == "kv4"), 77)
    if kind == "kv4":
        assert dt == torch.float16 and args[5:11] == tuple(t[0].data_ptr() for t in (c.kc, c.ks, c.kz, c.vc, c.vs,
                                                                                     c.vz))
        assert args[11:13] == (kk.data_ptr(), vv.data_ptr()) and kk.shape == (b, KVH, s, D) == vv.shape
        assert kk.dtype == vv.dtype == torch.float16
    else:
        assert dt == torch.bfloat16 and args[5:13] == (c.k[0].data_ptr(), 0, 0, c.v[0].data_ptr(), 0, 0, 0, 0)
        assert kk.data_ptr() == c.k[0].data_ptr() and kk.shape == (b, KVH, s, D)


@pytest.mark.parametrize("kind,dtype,kernel", [("kv16", torch.float16, True), ("kv16", torch.bfloat16, False),
                                               ("kv16", torch.float32, False), ("kv4", torch.float16, True),
                                               ("kv4", torch.bfloat16, True), ("kv4", torch.float32, False)])
def test_the_prefill_takes_the_kernel_by_the_decode_steps_rule(fake_ext, monkeypatch, kind, dtype, kernel):
    """16-bit cache: q/k/v in the cache's dtype (fp16 here); KV4: fp16 or bf16. Else the torch path."""
    b, s = 2, 4
    _, (q, k, v) = _rows(b, s, dtype)
    cos, sin = _tables(9)
    c = _kernel_cache(kind)
    torch_path = []
    monkeypatch.setattr(cache_mod, "_rope_prefill", lambda *a: torch_path.append(a) or (None, None, None))
    monkeypatch.setattr(c, "prefill", lambda *a: None)
    c.prefill_rows(0, q, k, v, b, cos, sin)
    assert (len(fake_ext.calls), len(torch_path)) == ((1, 0) if kernel else (0, 1))
    if kind == "kv4":   # mixed dtypes: torch
        c.prefill_rows(0, q.half(), k.bfloat16(), v.half(), b, cos, sin)
        assert len(torch_path) == 1 + (not kernel)


def test_the_prefill_kernel_is_on_unless_turned_off(monkeypatch):
    """The prefill kernel runs unless DCC_PREFILL_KERNEL=0; a CPU cache never takes it."""
    for env, want in ((None, True), ("1", True), (" 0 ", False), ("0", False), ("yes", True)):
        if env is None:
            monkeypatch.delenv("DCC_PREFILL_KERNEL", raising=False)
        else:
            monkeypatch.setenv("DCC_PREFILL_KERNEL", env)
        assert cache_mod.prefill_kernel_enabled() == want
        assert not KV4Cache(1, 1, KVH, 8, D, H, "cpu").prefill_kernel


def test_a_prefill_the_cache_cannot_hold_is_refused(fake_ext):
    """Longer than the slots or the RoPE tables, more sequences than the cache's: an error before any launch (the
    kernel would write out of bounds)."""
    cos, sin = _tables(9)
    for b, s, cap in ((1, 10, 12), (1, 10, 9), (3, 4, 9)):
        _, (q, k, v) = _rows(b, s, torch.float16)
        with pytest.raises(ValueError, match=f"{b} x {s} tokens"):
            _kernel_cache("kv4", cap=cap).prefill_rows(0, q, k, v, b, cos, sin)
    assert not fake_ext.calls


def test_attention_splits_fill_the_sms_down_to_16_slots(monkeypatch):
    """Few sequences: their slots are split into smaller chunks until about 2 CTAs per SM run, but not below 16 slots
    (or DCC_ATTN_MIN_CHUNK); many sequences keep 256-slot chunks. The splits cover the capacity."""
    monkeypatch.delenv("DCC_ATTN_MIN_CHUNK", raising=False)
    assert ops.attn_split(1, 8, 384, 132) == (16, 24)       # Llama-3-8B at batch 1: 192 CTAs
    assert ops.attn_split(4, 8, 384, 132) == (32, 12)       # 384 CTAs >= 2 x 132 at 32 slots
    assert ops.attn_split(64, 8, 384, 132) == (256, 2)
    assert ops.attn_split(1, 1, 100, 132) == (16, 7)        # 7 x 16 >= 100
    monkeypatch.setenv("DCC_ATTN_MIN_CHUNK", "64")
    assert ops.attn_split(1, 8, 384, 132) == (64, 6)
    monkeypatch.setenv("DCC_ATTN_CHUNK", "64")              # forced (benchmarks), at any batch
    assert ops.attn_split(64, 8, 384, 132) == (64, 6)
    monkeypatch.setenv("DCC_ATTN_CHUNK", "48")
    with pytest.raises(ValueError, match="DCC_ATTN_CHUNK=48"):
        ops.attn_split(64, 8, 384, 132)
