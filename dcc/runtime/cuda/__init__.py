"""dcc's CUDA runtime: W4A16 kernels (csrc/w4a16) that execute TinyChat-layout artifacts on the GPU, W4A8 kernels
(csrc/w4a8, w4a8_ops.py) for QServe-layout artifacts, and W4A4 kernels (csrc/w4a4, w4a4_ops.py) for Nunchaku INT4
artifacts.

The extension is compiled with nvcc on first use (see build.py) and cached; importing this package needs only torch
and does not build anything, so a CPU-only install is unaffected.

    from dcc.runtime.cuda import w4a16_linear, dequantize, available
    y = w4a16_linear(x, qweight, scales, scaled_zeros, group_size=128)   # x [M, K] fp16/bf16 on the GPU
"""
from __future__ import annotations

from .build import HINT, CudaRuntimeUnavailable, build, load
from .ops import FUSED_MAX_M, dequantize, w4a16_linear

__all__ = ["HINT", "CudaRuntimeUnavailable", "FUSED_MAX_M", "available", "build", "dequantize", "load",
           "require", "w4a16_linear"]


def require(name: str = "w4a16") -> None:
    """Build/import the extension `name` (w4a16, w4a8 or w4a4) now; raises CudaRuntimeUnavailable with a one-line
    reason if it cannot."""
    load(name=name)


def available(name: str = "w4a16") -> tuple[bool, str]:
    """(True, "") if the CUDA runtime `name` (w4a16, w4a8 or w4a4) can be used here, else (False, the one-line
    reason)."""
    try:
        load(name=name)
    except CudaRuntimeUnavailable as e:
        return False, str(e).splitlines()[0]
    return True, ""
