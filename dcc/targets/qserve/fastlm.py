"""QServe's part of the fast decoder (dcc/runtime/fastlm, Target.fast_decoder): W4A8 linears on the W4A8 GEMM
(csrc/w4a8) with int8 per-token activations, fp16 activations, and for an artifact QServe's engine runs its fused
norm + quantization and silu_and_mul (csrc/w4a8/quant_fused.cu; numerics_fused.py on the CPU)."""
from __future__ import annotations

import torch

from ...runtime.fastlm.kinds import FastKind
from ...runtime.fastlm.linear import QAct, stored
from . import numerics_fused
from .reference import TENSORS, QServeLinear, exact_int_matmul

PER_CHANNEL, GROUPED = "qserve-w4a8-per-channel", "qserve-w4a8-group"


class W4A8:
    """QServe W4A8: int8 per-token activations (quantized here by the standalone quant kernel, or given as a QAct by
    the fused norm), the W4A8 GEMM, fp16 out. CPU: reference.QServeLinear (exact integer GEMM and the engine's
    epilogue); its output is fp16-valued float32."""

    def __init__(self, fmt: str, t: dict, n: int, k: int, device):
        self.fmt, self.n, self.k = fmt, n, k
        self.group = 0 if fmt == PER_CHANNEL else k // t["s2_scales"].shape[0]
        self.cpu = torch.device(device).type == "cpu"
        if self.cpu:
            self.ref = QServeLinear(fmt, t, n, k, None)
        else:
            self.t = {name: v.to(device).contiguous() for name, v in t.items()}

    def __call__(self, x) -> torch.Tensor:
        if self.cpu:
            if isinstance(x, QAct):
                return self.ref.epilogue(exact_int_matmul(x.codes, self.ref.ints), x).to(torch.float32)
            return self.ref(x.to(torch.float32))
        from ...runtime.cuda.w4a8_ops import gemm, quantize_act
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


class QServeFast(FastKind):
    formats = (PER_CHANNEL, GROUPED)
    row_block = 32   # 32-row tiles

    def gpu_dtype(self, art) -> torch.dtype:
        return torch.float16   # QServe's kernels take fp16 activations

    def engine(self, art) -> bool:
        # the reference model swaps in the fused kernels exactly where the target's prepare_reference does
        return "qserve" in (art.manifest.get("engines") or [])

    def load(self, art, names: list[str], fmt: str, device, dtype: torch.dtype):
        entries = [art.manifest["layers"][n] for n in names]
        return W4A8(fmt, stored(art, names, TENSORS[fmt]), sum(e["shape"][0] for e in entries),
                    entries[0]["shape"][1], device)

    def norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float, with_sum: bool, approx: int) -> QAct:
        """rms_norm_general[_fuse_sum] (a layer norm without bias, then int8 per token) of x [M, H]: the engine's
        kernel on the GPU (approx 1: its MUFU instructions), numerics_fused on the CPU."""
        if not x.is_cuda:
            a = numerics_fused.quantize_normed(
                numerics_fused.layernorm_f32(x.to(torch.float32), weight.to(torch.float32), eps), with_sum)
            return QAct(a.codes, a.scale, a.sum)
        from ...runtime.cuda import qserve_fused_ops
        return QAct(*qserve_fused_ops.norm_quant(x, weight, eps, with_sum, bool(approx)))

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, approx: int) -> torch.Tensor:
        """silu_and_mul (fp16 out): the engine's kernel on the GPU, numerics_fused on the CPU."""
        if not gate.is_cuda:
            return numerics_fused.silu_and_mul(gate, up)
        from ...runtime.cuda import qserve_fused_ops
        return qserve_fused_ops.silu_mul(gate, up, bool(approx))
