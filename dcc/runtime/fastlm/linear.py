"""The fast decoder's linear layers, loaded straight from the artifact's stored tensors: 16-bit (a layer the compile
kept unquantized, the head), TinyChat W4A16 (csrc/w4a16 on the GPU; the decoded weight in float32 on the CPU, as the
reference) and QServe W4A8 (csrc/w4a8 on the GPU; the target's reference linear on the CPU). Projections that read
the same input (q/k/v, gate/up) are concatenated along N into one GEMM where the layout allows it (TinyChat: rows in
blocks of 4; QServe: 32-row tiles), which is exact: each output row depends only on its own weight rows."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .spec import W4A8_FORMATS, W4A16_FORMATS


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


class W4A16:
    """TinyChat W4A16: the W4A16 kernels on the GPU (x cast to the scales' dtype), the decoded weight on the CPU."""

    def __init__(self, t: dict, n: int, group: int, weight: torch.Tensor | None):
        self.t, self.n, self.group, self.w = t, n, group, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is not None:
            return F.linear(x.to(self.w.dtype), self.w)
        from ..cuda.ops import w4a16_linear
        return w4a16_linear(x.to(self.t["scales"].dtype), self.t["qweight"], self.t["scales"],
                            self.t["scaled_zeros"], self.group)


class W4A8:
    """QServe W4A8: int8 per-token activations (quantized here by the standalone quant kernel, or given as a QAct by
    the fused norm), the W4A8 GEMM, fp16 out. CPU: targets.qserve.reference.QServeLinear (exact integer GEMM and the
    engine's epilogue); its output is fp16-valued float32."""

    def __init__(self, fmt: str, t: dict, n: int, k: int, device):
        self.fmt, self.n, self.k = fmt, n, k
        self.group = 0 if fmt == "qserve-w4a8-per-channel" else k // t["s2_scales"].shape[0]
        self.cpu = torch.device(device).type == "cpu"
        if self.cpu:
            from ...targets.qserve.reference import QServeLinear
            self.ref = QServeLinear(fmt, t, n, k, None)
        else:
            self.t = {name: v.to(device).contiguous() for name, v in t.items()}

    def __call__(self, x) -> torch.Tensor:
        if self.cpu:
            if isinstance(x, QAct):
                from ...targets.qserve.reference import exact_int_matmul
                return self.ref.epilogue(exact_int_matmul(x.codes, self.ref.ints), x).to(torch.float32)
            return self.ref(x.to(torch.float32))
        from ..cuda.w4a8_ops import gemm, quantize_act
        if isinstance(x, QAct):
            xq, scale, ssum = x
            lead = xq.shape[:-1]
        else:
            lead = x.shape[:-1]
            xq, scale, ssum = quantize_act(x.reshape(-1, self.k).to(torch.float16), with_sum=self.group == 0)
        t, g = self.t, self.group
        y = gemm(xq.reshape(-1, self.k), scale, ssum, t["qweight"], t["s1_scales"], t.get("s1_szeros"),
                 t.get("s2_scales"), t.get("s2_zeros"), g)
        return y.reshape(*lead, self.n)


_CAT0 = {"qweight": 0, "s1_scales": 0, "s1_szeros": 0, "s2_scales": 1, "s2_zeros": 1, "scales": 1, "scaled_zeros": 1}


def _tensors(art, name: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {t: art.tensors.get(f"{name}.{t}") for t in names}


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
    cpu = torch.device(device).type == "cpu"
    if fmt is None:   # kept in 16 bits
        w = torch.cat([art.tensors.get(f"{n}.weight") for n in names])
        return Dense(w.to(device=device, dtype=dtype))
    if fmt in W4A16_FORMATS:
        if len(names) > 1 and any(n % 4 for n in ns):
            return None
        group = int(entries[0]["spec"]["group_size"])
        if cpu:
            w = torch.cat([art.decode(n) for n in names]).to(dtype)
            return W4A16({}, sum(ns), group, w)
        parts = [_tensors(art, n, ("qweight", "scales", "scaled_zeros")) for n in names]
        t = {k: torch.cat([p[k] for p in parts], dim=_CAT0[k]).to(device).contiguous() for k in parts[0]}
        return W4A16(t, sum(ns), group, None)
    if fmt in W4A8_FORMATS:
        if len(names) > 1 and any(n % 32 for n in ns):
            return None
        from ...targets.qserve.reference import TENSORS
        parts = [_tensors(art, n, TENSORS[fmt]) for n in names]
        t = {k: torch.cat([p[k] for p in parts], dim=_CAT0[k]).contiguous() for k in parts[0]}
        return W4A8(fmt, t, sum(ns), ks.pop(), device)
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
