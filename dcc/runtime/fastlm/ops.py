"""The fast decoder's fused ops: each runs its CUDA kernel (csrc/attn, module dcc_attn_ext) on a GPU tensor where the
kernel takes the shape, else its torch version (ref_ops.py), which is also what runs on the CPU. A target's own fused
ops (QServe's norm and SiLU) are its FastKind's. Raw data_ptr()s and the current stream go to the extensions (no
libtorch there)."""
from __future__ import annotations

import os

import torch

from . import ref_ops

_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ATTN_CHUNK = 256        # tokens per block of the decode attention kernel (its shared memory holds G x 256 scores)


def _ext(name: str = "attn"):
    from ..cuda.build import load
    return load(name=name)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype, norm: bool = True) -> torch.Tensor:
    """h [M, H] float32 += delta; returns RMSNorm(h) * weight (norm) or h itself, in out_dtype."""
    if (h.is_cuda and out_dtype in (torch.float16, torch.bfloat16) and weight.dtype == out_dtype
            and (delta is None or delta.dtype == out_dtype)):
        m, hd = h.shape
        out = torch.empty(m, hd, dtype=out_dtype, device=h.device)
        d = None if delta is None else delta.reshape(m, hd).contiguous()
        _ext().add_rmsnorm(h.data_ptr(), 0 if d is None else d.data_ptr(), weight.data_ptr(), out.data_ptr(), m, hd,
                           float(eps), _DT[out_dtype], int(norm), _stream(h))
        return out
    if not norm:
        if delta is not None:
            h += delta.to(torch.float32)
        return h.to(out_dtype)
    return ref_ops.add_rmsnorm(h, delta, weight, eps, out_dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """SiLU(gate) * up: in one kernel where gate and up are the two halves of one [M, 2I] GEMM output."""
    fused = (gate.is_cuda and gate.dtype == up.dtype == out_dtype and gate.dim() == 2 and gate.stride(1) == 1
             and gate.stride(0) == up.stride(0)
             and up.data_ptr() == gate.data_ptr() + gate.shape[1] * gate.element_size())
    if fused and out_dtype in (torch.float16, torch.bfloat16):
        m, i = gate.shape
        out = torch.empty(m, i, dtype=out_dtype, device=gate.device)
        _ext().silu_mul(gate.data_ptr(), out.data_ptr(), m, i, gate.stride(0), _DT[out_dtype], _stream(gate))
        return out
    return ref_ops.silu_mul(gate, up, out_dtype)


def silu_mul_blocks(gu: torch.Tensor, block: int, out_dtype: torch.dtype) -> torch.Tensor:
    """SiLU(gate) * up of gu [M, 2I] whose columns interleave gate and up in blocks of `block` (gate first): the
    gate_up layout of csrc/w4a16's gemv_glu, where the GEMM ran without its SwiGLU epilogue. [M, I] in out_dtype."""
    m, n = gu.shape
    if gu.is_cuda and gu.dtype == out_dtype in (torch.float16, torch.bfloat16) and gu.stride(1) == 1:
        out = torch.empty(m, n // 2, dtype=out_dtype, device=gu.device)
        _ext().silu_mul(gu.data_ptr(), out.data_ptr(), m, n // 2, gu.stride(0), _DT[out_dtype], _stream(gu), block)
        return out
    pairs = gu.reshape(m, n // (2 * block), 2, block)
    return ref_ops.silu_mul(pairs[:, :, 0].reshape(m, -1), pairs[:, :, 1].reshape(m, -1), out_dtype)


def kernel_takes(head_dim: int, group: int) -> bool:
    """Whether csrc/attn's decode kernels take this head: head_dim / 8 lanes a power of two up to a warp, and at
    most 8 query heads per KV head."""
    lanes = head_dim // 8
    return head_dim % 8 == 0 and 1 <= lanes <= 32 and lanes & (lanes - 1) == 0 and group <= 8


def attn_split(batch: int, kv_heads: int, capacity: int, sms: int) -> tuple[int, int]:
    """(tokens per block, blocks per sequence and KV head) of the decode attention kernel: the slots of few sequences
    are split over more blocks (the last one merges the partial softmaxes) so that about 2 blocks run per SM."""
    forced = int(os.environ.get("DCC_ATTN_CHUNK", "0"))   # benchmarks: this chunk whatever the batch (16..256)
    if forced:
        if forced not in (16, 32, 64, 128, 256):
            raise ValueError(f"DCC_ATTN_CHUNK={forced}: the decode attention kernel takes 16, 32, 64, 128 or 256")
        return forced, -(-capacity // forced)
    chunk = ATTN_CHUNK
    # the finest split taken (DCC_ATTN_MIN_CHUNK: benchmarks). 16: at batch 1 (Llama-3-8B, 256 of 384 slots) 192
    # CTAs of 16 slots took 13.5 us a launch against 15.5 us for 96 of 32 (csrc/attn/DESIGN.md)
    smallest = int(os.environ.get("DCC_ATTN_MIN_CHUNK", "16"))
    while chunk > smallest and batch * kv_heads * -(-capacity // chunk) < 2 * sms:
        chunk //= 2
    return chunk, -(-capacity // chunk)
