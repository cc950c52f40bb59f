"""GPTQ (Frantar et al., 2023): quantize columns one at a time and spread each column's error over the columns not yet
quantized through the inverse Hessian H = 2/T X^T X. Act-order, static groups and damping as DeepCompressor runs it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..ir.formats import QuantizedTensor, compute_qparams, dequantize, quantize
from .base import Pass, PassConfig, PassResult, quantizable, register
from .rtn import quantize_linear


@dataclass(frozen=True)
class GptqConfig(PassConfig):
    """damp: fraction of mean(diag H) added to the diagonal; block_size: columns per lazy batch update;
    act_order: quantize columns by decreasing diag(H); static_groups: group scales fixed from the whole weight before
    the sweep (needed with act_order so that each group keeps one scale, as engines store it)."""
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True

    def __post_init__(self):
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"gptq: damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq: block_size must be >= 1, got {self.block_size}")
        if self.act_order and not self.static_groups:
            raise ValueError("gptq: act_order needs static_groups (a group's scale must not change mid-sweep)")


def _clip_col(clip, g: int):
    """The clip ratio(s) of group g as a [N, 1] tensor or a scalar."""
    return clip[:, g:g + 1] if isinstance(clip, torch.Tensor) and clip.dim() == 2 else clip


def _inverse_hessian_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; adds more damping if H is not positive definite."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(10):
        try:
            l = torch.linalg.cholesky(h + (damp + 0.01 * attempt) * mean_diag * eye)
            hinv = torch.cholesky_inverse(l)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("Hessian is not positive definite even with 10x damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, x: torch.Tensor, spec, config: GptqConfig, clip=1.0) -> QuantizedTensor:
    """GPTQ on weight w [N, K] with inputs x [T, K]; returns the QuantizedTensor (codes in the original column order)."""
    n, k = w.shape
    h = (x.double().T @ x.double()) * (2.0 / x.shape[0])
    w = w.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = compute_qparams(w.float(), spec, clip)   # static groups: fixed before the sweep
    gs = k if spec.group_size <= 0 else spec.group_size
    col_spec = dataclasses.replace(spec, group_size=0)     # one column at a time, with its group's parameters
    perm = torch.argsort(torch.diagonal(h), descending=True) if config.act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_chol(h, config.damp)
    codes = torch.zeros(n, k, dtype=torch.int16)
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs if spec.group_size > 0 else 0
            if not config.static_groups and spec.group_size > 0 and col % gs == 0:
                # dynamic groups (no act-order): the group's range from the weights as updated so far
                if i + gs > w1.shape[1]:
                    raise ValueError(f"gptq: block_size {config.block_size} must be a multiple of the group size "
                                     f"{gs} for dynamic groups")
                cols = w1[:, i:i + gs].float()
                gsc, gz = compute_qparams(cols, dataclasses.replace(spec, group_size=0), _clip_col(clip, g))
                scale[:, g:g + 1] = gsc
                if zero is not None:
                    zero[:, g:g + 1] = gz
            s = scale[:, g:g + 1] if scale.numel() > 1 else scale.expand(n, 1)
            z = None if zero is None else (zero[:, g:g + 1] if zero.numel() > 1 else zero.expand(n, 1))
            q = quantize(w1[:, i:i + 1].float(), col_spec, s, z)
            deq = dequantize(q, s, z, col_spec).double()
            codes[:, col] = q[:, 0].to(torch.int16)
            e = (w1[:, i] - deq[:, 0]) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return QuantizedTensor(codes, scale, zero, spec)


@register
class Gptq(Pass):
    Config = GptqConfig
    uses_activations = True
    ensures = ("quantized",)

    def run(self, block, config, ctx) -> PassResult:
        details = {}
        lins = [l for l in quantizable(block) if l.qtensor is None]
        prev = None
        for lin in lins:
            # true-sequential: a linear whose input differs from the previous one's (a later stage of the block)
            # sees the inputs produced by the layers already quantized
            if prev is not None and ctx.inputs(lin.name) is not ctx.inputs(prev):
                ctx.invalidate()
            w = block.linear_module(lin.name).weight.data.float()
            x = ctx.inputs(lin.name)
            qt = gptq_quantize(w, x, lin.spec, config, lin.stats.get("clip", 1.0))
            details[lin.name] = round(quantize_linear(block, lin, codes_from=qt, x=x)["sqnr_db"], 2)
            prev = lin.name
        return PassResult(bool(lins), f"GPTQ on {len(lins)} linears", {"sqnr_db": details})
