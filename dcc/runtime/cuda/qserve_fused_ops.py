"""Torch-facing wrappers of QServe's activation kernels as the engine runs them (csrc/w4a8/quant_fused.cu, module
dcc_w4a8_ext): the fused norm cut at its float32 normed values (norm_y, quant_normed), the standalone quantization
(quant_engine) and silu_and_mul's SiLU. approx=True executes the engine's approximate MUFU instructions (QServe's own
bits); approx=False the correctly rounded stand-ins of dcc's CPU emulation (dcc/targets/qserve/numerics_fused.py,
numerics.py), bit for bit."""
from __future__ import annotations

import torch

from .w4a8_ops import _dense, _stream, ext


def _rows(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if not x.is_cuda or x.dim() < 1:
        raise ValueError(f"{name} must be a CUDA tensor, got {tuple(x.shape)} on {x.device}")
    return _dense(x.reshape(-1, x.shape[-1]).to(dtype))


def norm_y(x: torch.Tensor, weight: torch.Tensor, eps: float, approx: bool = True) -> torch.Tensor:
    """float32 normed values [..., H] of rms_norm_general (a layer norm without bias) on x rounded to fp16."""
    x2 = _rows(x, torch.float16, "x")
    w = _dense(weight.to(device=x2.device, dtype=torch.float16).reshape(-1))
    m, h = x2.shape
    if w.numel() != h:
        raise ValueError(f"norm weight has {w.numel()} elements, the input {h} channels")
    y = torch.empty(m, h, dtype=torch.float32, device=x2.device)
    if m:
        with torch.cuda.device(x2.device):
            ext().norm_y(x2.data_ptr(), w.data_ptr(), float(eps), y.data_ptr(), m, h, int(approx), _stream(x2.device))
    return y.reshape(x.shape)


def _codes(m: int, k: int, with_sum: bool, device):
    return (torch.empty(m, k, dtype=torch.int8, device=device), torch.empty(m, dtype=torch.float16, device=device),
            torch.empty(m, dtype=torch.float16, device=device) if with_sum else None)


def quant_normed(y: torch.Tensor, with_sum: bool, approx: bool = True):
    """(int8 codes [M, H], fp16 scale [M], fp16 sum [M] or None) of float32 normed values y: the fused norm's rule."""
    y2 = _rows(y, torch.float32, "y")
    m, h = y2.shape
    xq, scale, ssum = _codes(m, h, with_sum, y2.device)
    if m:
        with torch.cuda.device(y2.device):
            ext().quant_normed(y2.data_ptr(), xq.data_ptr(), scale.data_ptr(), 0 if ssum is None else ssum.data_ptr(),
                               m, h, int(approx), _stream(y2.device))
    return xq, scale, ssum


def quant_engine(x: torch.Tensor, with_sum: bool, approx: bool = True):
    """(int8 codes [M, K], fp16 scale [M], fp16 sum [M] or None) of x rounded to fp16: the standalone quant kernel."""
    x2 = _rows(x, torch.float16, "x")
    m, k = x2.shape
    xq, scale, ssum = _codes(m, k, with_sum, x2.device)
    if m:
        with torch.cuda.device(x2.device):
            ext().quant_engine(x2.data_ptr(), xq.data_ptr(), scale.data_ptr(), 0 if ssum is None else ssum.data_ptr(),
                               m, k, int(approx), _stream(x2.device))
    return xq, scale, ssum


def silu16(gate: torch.Tensor, approx: bool = True) -> torch.Tensor:
    """fp16 SiLU of silu_and_mul_kernel on gate rounded to fp16 (the kernel with up = 1: fp16(s * 1) = s)."""
    g = _rows(gate, torch.float16, "gate")
    ones = torch.ones_like(g)
    out = torch.empty_like(g)
    m, d = g.shape
    if m:
        with torch.cuda.device(g.device):
            ext().silu_mul(g.data_ptr(), ones.data_ptr(), out.data_ptr(), m, d, int(approx), _stream(g.device))
    return out.reshape(gate.shape)
