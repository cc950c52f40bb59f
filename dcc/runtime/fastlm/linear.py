"""The fast decoder's linear layers, loaded straight from the artifact's stored tensors: 16-bit (a layer the compile
kept unquantized, the head), or the target's quantized linear (its FastKind: TinyChat's W4A16, QServe's W4A8).
Projections that read the same input (q/k/v, gate/up) are concatenated along N into one GEMM where the layout allows
it (whole row blocks of the layout), which is exact: each output row depends only on its own weight rows."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kinds import kind_of


class QAct(NamedTuple):
    """Activations already quantized per token (QServe's fused norm): GPU int8 codes [M, K], fp16 scale [M], fp16
    sum [M] or None; CPU: dcc.ir.actquant.Int8Tokens (codes in float32, scale and sum [M, 1])."""
    codes: torch.Tensor
    scale: torch.Tensor
    sum: torch.Tensor | None


class Dense:
    """y = x W^T with the stored 16-bit weight, in the compute dtype (float32 on the CPU)."""

    def __init__(self, w: torch.Tensor):
        self.w, self.n = w, w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.w.dtype), self.w)


_CAT0 = {"qweight": 0, "s1_scales": 0, "s1_szeros": 0, "s2_scales": 1, "s2_zeros": 1, "scales": 1, "scaled_zeros": 1}


def stored(art, names: list[str], tensors: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The layers' stored tensors, each concatenated along its output-channel axis (a layout's row-major qweight and
    per-row scales along dim 0, group-major scales and zeros along dim 1)."""
    parts = [{t: art.tensors.get(f"{n}.{t}") for t in tensors} for n in names]
    return {k: torch.cat([p[k] for p in parts], dim=_CAT0[k]).contiguous() for k in parts[0]}


def load_linear(art, names: list[str], device, dtype: torch.dtype):
    """One linear computing the layers `names` (their outputs concatenated along N), or None where they cannot be
    concatenated (different formats, specs or K, or N not a multiple of the layout's row block)."""
    entries = [art.manifest["layers"].get(n, {}) for n in names]
    fmts = {e.get("format") if "skip_reason" not in e else None for e in entries}
    specs = {str(e.get("spec")) for e in entries}
    ks = {e.get("shape", [0, 0])[1] for e in entries}
    if len(fmts) != 1 or len(specs) != 1 or len(ks) != 1:
        return None
    fmt = fmts.pop()
    ns = [e.get("shape", [0, 0])[0] for e in entries]
    if fmt is None:   # kept in 16 bits
        w = torch.cat([art.tensors.get(f"{n}.weight") for n in names])
        return Dense(w.to(device=device, dtype=dtype))
    kind = kind_of(art)
    if kind is not None and fmt in kind.formats:
        if len(names) > 1 and any(n % kind.row_block for n in ns):
            return None
        return kind.load(art, names, fmt, device, dtype)
    raise ValueError(f"layer {names[0]}: format {fmt!r} is not one the fast decoder runs")


def load_group(art, names: list[str], device, dtype: torch.dtype, fuse: bool = True) -> list:
    """[one fused linear] where the layers concatenate (and fuse is on), else one linear per layer."""
    if fuse and len(names) > 1:
        lin = load_linear(art, names, device, dtype)
        if lin is not None:
            return [lin]
    return [load_linear(art, [n], device, dtype) for n in names]


def run_group(group: list, x, sizes: list[int]) -> list[torch.Tensor]:
    """The outputs of each layer of a group (split back along N where it was fused)."""
    if len(group) == 1 and len(sizes) > 1:
        return list(torch.split(group[0](x), sizes, dim=-1))
    return [lin(x) for lin in group]
