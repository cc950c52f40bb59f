"""The fast decoder's static KV caches, allocated once per run as [layers, batch, kv_heads, capacity, ...]: 16-bit
K/V, or QServe's KV4 (4-bit codes, two per byte with the even channel in the low nibble, fp16 scale and zero per
token and head, as the artifact's runtime.kv_cache defines it). A decode step writes slot pos[b] of each sequence and
attends to slots 0..pos[b]: on the GPU one csrc/attn launch a layer (RoPE, cache write, attention; a 16-bit cache
can use scaled_dot_product_attention instead), on the CPU torch ops. Prefill writes slots 0..S-1 and attends
causally through scaled_dot_product_attention (KV4: to the dequantized K/V, as the reference's dcc::quant_kv does);
on the GPU its RoPE and cache write (and KV4's read-back) are one csrc/attn launch a layer (rope_write_rows), with the
bits of the torch path (ref_ops), which stays the CPU path and the reference."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import ops, ref_ops


def _rope_decode(qkv, pos, cos, sin, heads, kv_heads, d):
    """Torch path of a decode step's RoPE: (q [B, H, D], k, v [B, KVH, D]) in float32."""
    b = qkv.shape[0]
    q, k, v = torch.split(qkv.to(torch.float32), [heads * d, kv_heads * d, kv_heads * d], dim=-1)
    c, s = cos[pos][:, None], sin[pos][:, None]
    return (ref_ops.rope(q.reshape(b, heads, d), c, s), ref_ops.rope(k.reshape(b, kv_heads, d), c, s),
            v.reshape(b, kv_heads, d))


def _rope_prefill(q, k, v, batch, cos, sin, heads, kv_heads, d):
    """Torch path of a prefill's RoPE: rows [B * S, ...] (sequence-major, positions 0..S-1) -> (q [B, H, S, D],
    k [B, KVH, S, D] in float32, v [B, KVH, S, D] as given)."""
    n = q.shape[0] // batch
    c, s = cos[:n][None, None], sin[:n][None, None]
    return (ref_ops.rope(q.reshape(batch, n, heads, d).transpose(1, 2), c, s),
            ref_ops.rope(k.reshape(batch, n, kv_heads, d).transpose(1, 2), c, s),
            v.reshape(batch, n, kv_heads, d).transpose(1, 2))


def prefill_kernel_enabled() -> bool:
    """The prefill's one-launch RoPE + cache write (rope_write_rows) runs unless DCC_PREFILL_KERNEL=0 (its GPU tests
    passed on an H100, 2026-12-07); with 0 the prefill takes the torch path (the reference)."""
    return os.environ.get("DCC_PREFILL_KERNEL", "1").strip() != "0"


def qkv_rows(q, k, v) -> tuple[torch.Tensor, int]:
    """q, k, v [R, ...] (one token a row) as the one qkv row buffer csrc/attn reads (q, then k, then v columns; unit
    column stride) and its row stride in elements: the fused GEMM's output itself where q, k, v are adjacent column
    blocks of it (torch.split's views: no copy), else their concatenation."""
    width = q.shape[1] + k.shape[1] + v.shape[1]
    es = q.element_size()
    adjacent = (q.dtype == k.dtype == v.dtype and q.stride(1) == k.stride(1) == v.stride(1) == 1
                and q.stride(0) == k.stride(0) == v.stride(0) >= width
                and k.data_ptr() == q.data_ptr() + q.shape[1] * es and v.data_ptr() == k.data_ptr() + k.shape[1] * es)
    if adjacent:
        return q.as_strided((q.shape[0], width), (q.stride(0), 1)), q.stride(0)
    return torch.cat([q, k, v], -1), width


class KVCache:
    """Shared by both caches: shapes, the decode kernel's split of the slots, the prefill's causal attention."""

    def __init__(self, layers, batch, kv_heads, capacity, head_dim, heads, device, sms: int = 132):
        self.layers, self.batch, self.kv_heads, self.capacity = layers, batch, kv_heads, capacity
        self.d, self.heads, self.device = head_dim, heads, torch.device(device)
        self.kernels = self.device.type == "cuda" and ops.kernel_takes(head_dim, heads // kv_heads)
        self.prefill_kernel = self.kernels and prefill_kernel_enabled()
        self.chunk, self.splits = ops.attn_split(batch, kv_heads, capacity, sms)
        if self.kernels:
            # partial outputs, maxima and sums of the splits, then one arrival counter per (sequence, KV head),
            # zero on entry (the kernel's last CTA resets its counter)
            self.ws = torch.zeros(batch * heads * self.splits * (head_dim + 2) + batch * kv_heads,
                                  dtype=torch.float32, device=device)

    def _fused(self, qkv, cos, sin, pos, ptrs, kv: int, out_dtype):
        """csrc/attn's decode attention in one launch: RoPE of the step's q and k (qkv [B, (H + 2 KVH) D], 16-bit),
        the step's K/V written into slot pos[b] (ptrs: the layer's cache), attention over slots 0..pos[b]."""
        b = qkv.shape[0]
        qkv = qkv.contiguous()
        out = torch.empty(b, self.heads, self.d, dtype=out_dtype, device=qkv.device)
        ops._ext().decode_attention(0, qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(),
                                    ops._DT[qkv.dtype], *ptrs, pos.data_ptr(), out.data_ptr(), self.ws.data_ptr(),
                                    b, self.heads, self.kv_heads, self.d, self.capacity, self.chunk, self.splits, kv,
                                    ops._DT[out_dtype], ops._stream(qkv))
        return out

    def prefill_rows(self, layer, q, k, v, batch, cos, sin):
        """A prefill as the qkv GEMM gives it: q [B * S, H * D], k and v [B * S, KVH * D] before RoPE (rows
        sequence-major, positions 0..S-1), RoPE tables cos/sin [P, D] -> causal attention output [B, H, S, D]; fills
        cache slots 0..S-1. On the GPU one rope_write_rows launch RoPEs q and k and writes the cache where the
        decode step would use a kernel too (16-bit q/k/v, in the cache's dtype for a 16-bit cache); else the torch
        path (ref_ops.rope, then prefill), which gives the same cache and attention inputs bit for bit."""
        if self.prefill_kernel and q.dtype == k.dtype == v.dtype and q.dtype in self._row_dtypes():
            n = q.shape[0] // batch
            if n > min(self.capacity, cos.shape[0]) or batch > self.batch or n * batch != q.shape[0]:
                raise ValueError(f"a prefill of {batch} x {n} tokens ({q.shape[0]} rows) does not fit the cache's "
                                 f"{self.batch} x {self.capacity} slots / {cos.shape[0]} RoPE positions")
            qkv, stride = qkv_rows(q, k, v)
            return self._prefill_kernel(layer, qkv, stride, batch, n, cos, sin)
        return self.prefill(layer, *_rope_prefill(q, k, v, batch, cos, sin, self.heads, self.kv_heads, self.d))

    def _row_dtypes(self) -> tuple:
        """The qkv dtypes the prefill kernel takes for this cache (decode's rule)."""
        raise NotImplementedError

    def _prefill_kernel(self, layer, qkv, stride, b, n, cos, sin):
        raise NotImplementedError

    def _rope_write_rows(self, qkv, stride, b, n, cos, sin, q_dtype, ptrs, kv4, deq=None):
        """csrc/attn's rope_write_rows over B * S = b * n rows of qkv (row stride `stride`) into the cache (ptrs: the
        layer's kc, ks, kz, vc, vs, vz) and, with deq = (kd, vd), KV4's read-back; -> q [B, H, S, D] in q_dtype (a
        view of the kernel's [B * S, H, D] rows, as the torch path's RoPE leaves it laid out)."""
        h, d = self.heads, self.d
        q = torch.empty(b * n, h, d, dtype=q_dtype, device=qkv.device)
        dptr = (0, 0) if deq is None else (deq[0].data_ptr(), deq[1].data_ptr())
        ops._ext().rope_write_rows(qkv.data_ptr(), stride, cos.data_ptr(), sin.data_ptr(), q.data_ptr(), *ptrs,
                                   *dptr, b, n, h, self.kv_heads, d, self.capacity, ops._DT[qkv.dtype],
                                   ops._DT[q_dtype], kv4, ops._stream(qkv))
        return q.view(b, n, h, d).transpose(1, 2)

    def _causal(self, q, k, v, dtype):
        """q [B, H, S, D] over k/v [B, KVH, S, D], causal, in `dtype` -> [B, H, S, D]."""
        return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True,
                                              enable_gqa=self.heads != self.kv_heads)


class KV16Cache(KVCache):
    """16-bit K/V. The decode step attends through csrc/attn's kernel (one launch reading slots 0..pos[b]) or, with
    sdpa=True or a head the kernel does not take, scaled_dot_product_attention over every slot with a mask."""

    def __init__(self, layers, batch, kv_heads, capacity, head_dim, heads, device, dtype, sms: int = 132,
                 sdpa: bool = False):
        super().__init__(layers, batch, kv_heads, capacity, head_dim, heads, device, sms)
        self.dtype, self.sdpa = dtype, sdpa
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.arange(capacity, device=device)

    def prefill(self, layer, q, k, v):
        s = k.shape[2]
        self.k[layer, :, :, :s] = k.to(self.dtype)
        self.v[layer, :, :, :s] = v.to(self.dtype)
        return self._causal(q, self.k[layer, :, :, :s], self.v[layer, :, :, :s], self.dtype)

    def _row_dtypes(self) -> tuple:
        return (self.dtype,)

    def _prefill_kernel(self, layer, qkv, stride, b, n, cos, sin):
        """q rounded to the cache's dtype (the torch path's q.to(dtype)); the attention reads the cache's slots."""
        kc, vc = self.k[layer], self.v[layer]
        q = self._rope_write_rows(qkv, stride, b, n, cos, sin, self.dtype, (kc.data_ptr(), 0, 0, vc.data_ptr(), 0, 0),
                                  0)
        return self._causal(q, kc[:, :, :n], vc[:, :, :n], self.dtype)

    def decode(self, layer, qkv, pos, cos, sin):
        """qkv [B, (H + 2 KVH) D] (before RoPE) at positions pos [B] -> attention output [B, H, D]."""
        b, h, d = qkv.shape[0], self.heads, self.d
        kc, vc = self.k[layer], self.v[layer]
        if self.kernels and qkv.dtype == self.dtype and not self.sdpa:
            return self._fused(qkv, cos, sin, pos, (kc.data_ptr(), 0, 0, vc.data_ptr(), 0, 0), ops._DT[self.dtype],
                               self.dtype)
        if self.kernels and qkv.dtype == self.dtype:   # RoPE + write in one kernel, then SDPA
            q = torch.empty(b, h, d, dtype=self.dtype, device=qkv.device)
            qkv = qkv.contiguous()
            ops._ext().rope_write(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(), pos.data_ptr(),
                                  q.data_ptr(), kc.data_ptr(), 0, 0, vc.data_ptr(), 0, 0, b, h, self.kv_heads, d,
                                  self.capacity, ops._DT[self.dtype], ops._DT[q.dtype], 0, ops._stream(qkv))
        else:
            q, k, v = _rope_decode(qkv, pos, cos, sin, h, self.kv_heads, d)
            rows = torch.arange(b, device=qkv.device)
            kc[rows, :, pos] = k.to(self.dtype)
            vc[rows, :, pos] = v.to(self.dtype)
        return ref_ops.decode_attention(q.to(self.dtype), kc, vc, pos + 1)


class KV4Cache(KVCache):
    def __init__(self, layers, batch, kv_heads, capacity, head_dim, heads, device, sms: int = 132):
        super().__init__(layers, batch, kv_heads, capacity, head_dim, heads, device, sms)
        codes = (layers, batch, kv_heads, capacity, head_dim // 2)
        meta = (layers, batch, kv_heads, capacity)
        self.kc = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.vc = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.ks, self.kz, self.vs, self.vz = (torch.zeros(meta, dtype=torch.float16, device=device) for _ in range(4))

    def _write(self, layer, idx: tuple, k, v) -> None:
        """Quantize k and v into the layer's cache at idx (batch, KV head, slot index: a prefill's slice of slots, or
        a decode step's one slot per sequence)."""
        for x, c, s, z in ((k, self.kc, self.ks, self.kz), (v, self.vc, self.vs, self.vz)):
            codes, scale, zero = ref_ops.kv4_quantize(x)
            c[layer][idx] = ref_ops.kv4_pack(codes)
            s[layer][idx], z[layer][idx] = scale, zero

    def _store(self, layer, sl, k, v):
        """Quantize k/v [B, KVH, S, D] into slots `sl`; returns their dequantized values (float32)."""
        idx = (slice(None), slice(None), sl)
        self._write(layer, idx, k, v)
        return [ref_ops.kv4_dequantize(c[layer][idx], s[layer][idx], z[layer][idx])
                for c, s, z in ((self.kc, self.ks, self.kz), (self.vc, self.vs, self.vz))]

    def dequantized(self, layer):
        """The whole layer's K and V, dequantized (float32 [B, KVH, T, D]): the torch path and the tests' reference."""
        return (ref_ops.kv4_dequantize(self.kc[layer], self.ks[layer], self.kz[layer]),
                ref_ops.kv4_dequantize(self.vc[layer], self.vs[layer], self.vz[layer]))

    def prefill(self, layer, q, k, v):
        kd, vd = self._store(layer, slice(0, k.shape[2]), k, v)
        # the reference attends to the dequantized (fp16-valued) K/V in float32; the GPU runs it in fp16 (flash)
        return self._causal(q, kd, vd, torch.float16 if q.is_cuda else torch.float32)

    def _row_dtypes(self) -> tuple:
        return (torch.float16, torch.bfloat16)

    def _prefill_kernel(self, layer, qkv, stride, b, n, cos, sin):
        """q in fp16 and K/V read back from the stored codes in fp16: the fp16 SDPA inputs of the torch path."""
        kd, vd = (torch.empty(b, self.kv_heads, n, self.d, dtype=torch.float16, device=qkv.device) for _ in range(2))
        ptrs = [t[layer].data_ptr() for t in (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz)]
        q = self._rope_write_rows(qkv, stride, b, n, cos, sin, torch.float16, ptrs, 1, (kd, vd))
        return self._causal(q, kd, vd, torch.float16)

    def decode(self, layer, qkv, pos, cos, sin):
        b, h, d = qkv.shape[0], self.heads, self.d
        if self.kernels and qkv.dtype in (torch.float16, torch.bfloat16):
            ptrs = [t[layer].data_ptr() for t in (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz)]
            return self._fused(qkv, cos, sin, pos, ptrs, 4, torch.float16)
        q, k, v = _rope_decode(qkv, pos, cos, sin, h, self.kv_heads, d)
        self._write(layer, (torch.arange(b, device=qkv.device), slice(None), pos), k, v)
        kd, vd = self.dequantized(layer)
        return ref_ops.decode_attention(q, kd, vd, pos + 1)
