"""QServe's fused activation ops as dcc:: operators, so that a captured block graph keeps each as one node whose
kernel depends on the device: on the CPU the emulation of numerics_fused.py (correctly rounded stand-ins for the
engine's MUFU instructions), on a GPU the kernels of csrc/w4a8/quant_fused.cu, which with engine=True execute those
MUFU instructions (QServe's own bits) and with engine=False the stand-ins (the CPU's bits).

  dcc::qserve_norm(x, weight, eps, engine)   float32 normed values of rms_norm_general (a layer norm without bias),
                                             returned in x's dtype
  dcc::qserve_silu(g, engine)                silu_and_mul's fp16 SiLU of g, returned in g's dtype

Where the CUDA extension cannot be built, the GPU runs the emulation (torch ops on the GPU: the CPU's bits)."""
from __future__ import annotations

import logging

import torch

from . import numerics_fused

log = logging.getLogger("dcc")

_LIB = torch.library.Library("dcc", "FRAGMENT")   # noqa: TOR901 - two ops defined once, at import
_LIB.define("qserve_norm(Tensor x, Tensor weight, float eps, bool engine) -> Tensor")
_LIB.define("qserve_silu(Tensor g, bool engine) -> Tensor")


def _norm_emulated(x, weight, eps: float, engine: bool):
    y = numerics_fused.layernorm_f32(x.reshape(-1, x.shape[-1]), weight, eps)
    return y.reshape(x.shape).to(x.dtype)


def _silu_emulated(g, engine: bool):
    return numerics_fused.silu16(g).to(g.dtype)


_KERNELS = None   # the fused-op wrappers, or False where the extension cannot be built here


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        try:
            from ...runtime.cuda import qserve_fused_ops
            qserve_fused_ops.ext()
            _KERNELS = qserve_fused_ops
        except Exception as e:   # no compiler, no headers: the emulation is the same function (CPU bits)
            log.warning("QServe fused kernels unavailable (%s); the GPU runs their emulation", str(e).splitlines()[0])
            _KERNELS = False
    return _KERNELS


def _norm_cuda(x, weight, eps: float, engine: bool):
    k = _kernels()
    if not k:
        return _norm_emulated(x, weight, eps, engine)
    return k.norm_y(x, weight, eps, approx=engine).to(x.dtype)


def _silu_cuda(g, engine: bool):
    k = _kernels()
    if not k:
        return _silu_emulated(g, engine)
    return k.silu16(g, approx=engine).to(g.dtype)


_LIB.impl("qserve_norm", _norm_emulated, "CPU")
_LIB.impl("qserve_silu", _silu_emulated, "CPU")
_LIB.impl("qserve_norm", _norm_cuda, "CUDA")
_LIB.impl("qserve_silu", _silu_cuda, "CUDA")
_LIB.impl("qserve_norm", lambda x, weight, eps, engine: torch.empty_like(x), "Meta")
_LIB.impl("qserve_silu", lambda g, engine: torch.empty_like(g), "Meta")

qserve_norm = torch.ops.dcc.qserve_norm.default
qserve_silu = torch.ops.dcc.qserve_silu.default
