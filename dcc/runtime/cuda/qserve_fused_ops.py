"""Torch-facing wrappers of QServe's activation kernels as the engine runs them (csrc/w4a8/quant_fused.cu, module
dcc_w4a8_ext): the fused norm cut at its float32 normed values (norm_y, quant_normed), the standalone quantization
(quant_engine) and silu_and_mul's SiLU. approx=True executes the engine's approximate MUFU instructions (QServe's own
bits); approx=False the correctly rounded stand-ins of dcc's CPU emulation (dcc/targets/qserve/numerics_fused.py,
numerics.py), bit for bit. norm_quant and silu_mul are the engine's kernels whole (the fast decoder's)."""
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


def _outputs(m: int, k: int, device, with_sum: bool):
    """The quantization kernels' outputs: int8 codes [M, K], fp16 scale [M], fp16 sum [M] or None."""
    xq = torch.empty(m, k, dtype=torch.int8, device=device)
    scale = torch.empty(m, dtype=torch.float16, device=device)
    return xq, scale, (torch.empty(m, dtype=torch.float16, device=device) if with_sum else None)


def _quantized(kernel: str, rows: torch.Tensor, with_sum: bool, approx: bool):
    """(int8 codes [M, K], fp16 scale [M], fp16 sum [M] or None) of rows [M, K] by the extension's `kernel`."""
    m, k = rows.shape
    xq, scale, ssum = _outputs(m, k, rows.device, with_sum)
    if m:
        with torch.cuda.device(rows.device):
            getattr(ext(), kernel)(rows.data_ptr(), xq.data_ptr(), scale.data_ptr(),
                                   0 if ssum is None else ssum.data_ptr(), m, k, int(approx), _stream(rows.device))
    return xq, scale, ssum


def quant_normed(y: torch.Tensor, with_sum: bool, approx: bool = True):
    """(int8 codes [M, H], fp16 scale [M], fp16 sum [M] or None) of float32 normed values y: the fused norm's rule."""
    return _quantized("quant_normed", _rows(y, torch.float32, "y"), with_sum, approx)


def quant_engine(x: torch.Tensor, with_sum: bool, approx: bool = True):
    """(int8 codes [M, K], fp16 scale [M], fp16 sum [M] or None) of x rounded to fp16: the standalone quant kernel."""
    return _quantized("quant_engine", _rows(x, torch.float16, "x"), with_sum, approx)


def norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, with_sum: bool, approx: bool = True):
    """(int8 codes, fp16 scale [M], fp16 sum [M] or None) of rms_norm_general[_fuse_sum] on x rounded to fp16, in one
    kernel (the same bits as norm_y then quant_normed)."""
    x2 = _rows(x, torch.float16, "x")
    w = _dense(weight.to(device=x2.device, dtype=torch.float16).reshape(-1))
    m, h = x2.shape
    xq, scale, ssum = _outputs(m, h, x2.device, with_sum)
    if m:
        with torch.cuda.device(x2.device):
            ext().norm_quant(x2.data_ptr(), w.data_ptr(), float(eps), xq.data_ptr(), scale.data_ptr(),
                             0 if ssum is None else ssum.data_ptr(), m, h, int(approx), _stream(x2.device))
    return xq, scale, ssum


def silu_mul(gate: torch.Tensor, up: torch.Tensor, approx: bool = True) -> torch.Tensor:
    """fp16 [M, D] of silu_and_mul_kernel on gate and up rounded to fp16."""
    g, u = _rows(gate, torch.float16, "gate"), _rows(up, torch.float16, "up")
    out = torch.empty_like(g)
    m, d = g.shape
    if m:
        with torch.cuda.device(g.device):
            ext().silu_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), m, d, int(approx), _stream(g.device))
    return out.reshape(gate.shape)


def silu16(gate: torch.Tensor, approx: bool = True) -> torch.Tensor:
    """fp16 SiLU of silu_and_mul_kernel on gate rounded to fp16 (the kernel with up = 1: fp16(s * 1) = s)."""
    return silu_mul(gate, torch.ones_like(gate, dtype=torch.float16), approx)
