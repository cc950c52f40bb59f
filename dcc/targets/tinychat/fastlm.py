"""TinyChat's part of the fast decoder (dcc/runtime/fastlm, Target.fast_decoder): W4A16 linears on the W4A16 kernels
(csrc/w4a16) on a GPU, the decoded weight in the compute dtype on the CPU (as the reference model computes them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...runtime.fastlm.kinds import FastKind
from ...runtime.fastlm.linear import stored
from .emit import FORMAT


class W4A16:
    """y = x W^T for a TinyChat W4A16 layer: the W4A16 kernels on the GPU (x cast to the scales' dtype), the decoded
    weight on the CPU."""

    def __init__(self, t: dict, n: int, group: int, weight: torch.Tensor | None):
        self.t, self.n, self.group, self.w = t, n, group, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is not None:
            return F.linear(x.to(self.w.dtype), self.w)
        from ...runtime.cuda.ops import w4a16_linear
        return w4a16_linear(x.to(self.t["scales"].dtype), self.t["qweight"], self.t["scales"],
                            self.t["scaled_zeros"], self.group)


class TinyChatFast(FastKind):
    formats = (FORMAT,)
    row_block = 4   # the GEMV layout interleaves rows in blocks of 4

    def load(self, art, names: list[str], fmt: str, device, dtype: torch.dtype):
        entries = [art.manifest["layers"][n] for n in names]
        n, group = sum(e["shape"][0] for e in entries), int(entries[0]["spec"]["group_size"])
        if torch.device(device).type == "cpu":
            return W4A16({}, n, group, torch.cat([art.decode(m) for m in names]).to(dtype))
        t = {k: v.to(device) for k, v in stored(art, names, ("qweight", "scales", "scaled_zeros")).items()}
        return W4A16(t, n, group, None)
