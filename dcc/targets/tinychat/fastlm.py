"""TinyChat's part of the fast decoder (dcc/runtime/fastlm, Target.fast_decoder): W4A16 linears on the W4A16 kernels
(csrc/w4a16) on a GPU, the decoded weight in the compute dtype on the CPU (as the reference model computes them)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ...runtime.fastlm.kinds import FastKind
from ...runtime.fastlm.linear import stored
from .emit import FORMAT


class W4A16:
    """y = x W^T for a TinyChat W4A16 layer: the W4A16 kernels on the GPU (x cast to the scales' dtype), the decoded
    weight on the CPU."""

    def __init__(self, t: dict, n: int, group: int, weight: torch.Tensor | None, fuse_norm: bool = False):
        self.t, self.n, self.group, self.w, self.fuse_norm = t, n, group, weight, fuse_norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is not None:
            return F.linear(x.to(self.w.dtype), self.w)
        from ...runtime.cuda.ops import w4a16_linear
        return w4a16_linear(x.to(self.t["scales"].dtype), self.t["qweight"], self.t["scales"],
                            self.t["scaled_zeros"], self.group)

    def add_rmsnorm(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                    counter: torch.Tensor) -> torch.Tensor | None:
        """h += x W^T, then RMSNorm(h) * weight, in this linear's GEMV launch (csrc/w4a16/gemv_norm.cu; the bits of
        the linear followed by the decoder's add_rmsnorm); None where that kernel does not run (the CPU, M > 8, other
        shapes), or where the linear was loaded without fuse_norm (TinyChatFast.load: DCC_FASTLM_NORM_GEMV=1)."""
        if self.w is not None or not self.fuse_norm:
            return None
        from ...runtime.cuda.ops import w4a16_linear_add_rmsnorm
        return w4a16_linear_add_rmsnorm(x.to(self.t["scales"].dtype), self.t["qweight"], self.t["scales"],
                                        self.t["scaled_zeros"], self.group, h, weight, eps, counter)


GLU_BLOCK = 8   # gate and up rows interleave in blocks of 8: one 16-row GEMV tile holds both halves of 8 outputs


def interleave_gate_up(t: dict, n_gate: int, block: int = GLU_BLOCK) -> dict:
    """The stored tensors of [gate; up] (n_gate rows each) with their rows reordered into blocks of `block` gate rows,
    each followed by the matching up rows: whole row blocks of the layout move (qweight [N/4, K] holds 4 rows a
    row; scales and scaled_zeros [Kg, N] one column a row), so the result decodes to the same rows, reordered."""
    q = t["qweight"]
    per = 2 * n_gate // q.shape[0]                     # weight rows per qweight row (4)
    if n_gate % block or block % per:
        raise ValueError(f"gate_up of {n_gate} rows cannot interleave in blocks of {block}")
    qg, qu = q[:n_gate // per], q[n_gate // per:]
    out = {"qweight": torch.stack([qg.reshape(-1, block // per, q.shape[1]), qu.reshape(-1, block // per, q.shape[1])],
                                  1).reshape(q.shape).contiguous()}
    for k in ("scales", "scaled_zeros"):
        v = t[k]
        g, u = v[:, :n_gate].reshape(v.shape[0], -1, block), v[:, n_gate:].reshape(v.shape[0], -1, block)
        out[k] = torch.stack([g, u], 2).reshape(v.shape).contiguous()
    return out


class W4A16Glu:
    """x -> SiLU(x Wg^T) * (x Wu^T) from one W4A16 GEMM over the interleaved gate_up weight: csrc/w4a16's gemv_glu
    (SwiGLU in the GEMV's epilogue) where it takes the shape (M <= 8), else the GEMM and silu_mul over the
    interleaved output. Bit for bit the gate_up GEMM followed by silu_mul."""

    def __init__(self, t: dict, n: int, group: int):
        self.t, self.n, self.group = t, n, group
        self.plain = W4A16(t, n, group, None)   # the GEMM alone, over the same interleaved tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ...runtime.cuda.build import load
        from ...runtime.cuda.ops import w4a16_glu
        from ...runtime.fastlm.ops import silu_mul_blocks
        x = x.to(self.t["scales"].dtype)
        m, k = x.numel() // x.shape[-1], x.shape[-1]
        if load().gemv_glu_fits(m, self.n, k):
            return w4a16_glu(x, self.t["qweight"], self.t["scales"], self.t["scaled_zeros"], self.group)
        y = self.plain(x)
        return silu_mul_blocks(y.reshape(m, self.n), GLU_BLOCK, x.dtype).reshape(*x.shape[:-1], self.n // 2)


class TinyChatFast(FastKind):
    formats = (FORMAT,)
    row_block = 4   # the GEMV layout interleaves rows in blocks of 4

    def load(self, art, names: list[str], fmt: str, device, dtype: torch.dtype):
        entries = [art.manifest["layers"][n] for n in names]
        n, group = sum(e["shape"][0] for e in entries), int(entries[0]["spec"]["group_size"])
        if torch.device(device).type == "cpu":
            return W4A16({}, n, group, torch.cat([art.decode(m) for m in names]).to(dtype))
        t = {k: v.to(device) for k, v in stored(art, names, ("qweight", "scales", "scaled_zeros")).items()}
        # the GEMV that ends in the decoder's add + RMSNorm: opt-in until measured end to end
        return W4A16(t, n, group, None, fuse_norm=os.environ.get("DCC_FASTLM_NORM_GEMV", "0") == "1")

    def load_glu(self, art, gate: str, up: str, device, dtype: torch.dtype):
        """On a GPU, gate and up of one format and group as one interleaved W4A16Glu (DCC_FASTLM_GLU=0: none)."""
        if torch.device(device).type != "cuda" or os.environ.get("DCC_FASTLM_GLU", "1") == "0":
            return None
        entries = [art.manifest["layers"].get(n, {}) for n in (gate, up)]
        if any(e.get("format") != FORMAT for e in entries) or entries[0].get("spec") != entries[1].get("spec") \
                or entries[0].get("shape") != entries[1].get("shape") or entries[0]["shape"][0] % GLU_BLOCK:
            return None
        n, group = 2 * entries[0]["shape"][0], int(entries[0]["spec"]["group_size"])
        t = interleave_gate_up(stored(art, [gate, up], ("qweight", "scales", "scaled_zeros")), n // 2)
        return W4A16Glu({k: v.to(device) for k, v in t.items()}, n, group)
