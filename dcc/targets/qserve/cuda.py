"""Run a QServe artifact on the GPU: its W4A8 linears execute through dcc's W4A8 kernels (csrc/w4a8: int8 per-token
activations, integer GEMM on the stored codes, fp16 epilogue) and its W8A8 linears through torch._int_mm with
QServe's float32 epilogue; everything else is the CPU reference model (float32, KV-cache quantization from the manifest)
moved to the GPU. Also the per-layer check of the kernels against the CPU reference (reference.py).

An artifact QServe's engine runs (its reference model has the engine's fused norms: reference.use_engine_kernels)
executes the engine's own activation rules on the GPU, MUFU instructions included (csrc/w4a8/quant_fused.cu with
approx = 1): the fused norm (dcc::qserve_norm, then quant_normed), the standalone quantization (quant_engine) and
silu_and_mul's SiLU, so that `dcc validate --device cuda` computes what QServe computes, bit for bit given the same
inputs; the CPU reference stands correctly rounded results in for the MUFU ones (numerics_fused.py counts how few
codes that moves)."""
from __future__ import annotations

import torch

from ...runtime.cuda import qserve_fused_ops
from ...runtime.cuda.w4a8_ops import gemm, quantize_act, w4a8_linear
from . import numerics, numerics_fused, reference

GROUPED, PER_CHANNEL, W8A8 = "qserve-w4a8-group", "qserve-w4a8-per-channel", "qserve-w8a8"


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] (b column-major, i.e. the transpose of a row-major [N, K]) -> int32 through cuBLAS;
    M is padded to 32 rows (some torch versions need M > 16)."""
    m = a.shape[0]
    if m < 32:
        a = torch.cat([a, a.new_zeros(32 - m, a.shape[1])])
    return torch._int_mm(a, b)[:m]


class W4A8Linear(torch.nn.Linear):
    """One QServe linear on the GPU kernels (an nn.Linear subclass, so hooks that look for nn.Linear see it). Same
    contract as reference.QServeLinear: fp16 outputs (bias added in fp16), returned in x's dtype; act_input "norm"
    (an input from QServeNorm) is quantized by the fused norm kernel's rule (numerics_fused, torch ops on the GPU).
    engine=True: every input is quantized by the engine's own kernels, MUFU.RCP included (qserve_fused_ops:
    quant_normed after a QServeNorm, quant_engine otherwise)."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], n: int, k: int, bias: torch.Tensor | None,
                 device, act_input: str = "quant", engine: bool = False):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt, self.act_input = k, n, fmt, act_input
        self.engine = bool(engine)
        self.weight = None
        for name, t in tensors.items():   # W8A8's "weight" is kept as weight_q: nn.Linear's weight stays None
            self.register_buffer("weight_q" if name == "weight" else name, t.to(device).contiguous())
        self.group = 0 if fmt != GROUPED else k // tensors["s2_scales"].shape[0]
        if fmt == W8A8:
            if k % 8 or n % 8:
                raise ValueError(f"W8A8 layer [{n}, {k}]: torch._int_mm needs N and K multiples of 8")
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device), requires_grad=False)

    def _fused(self, x: torch.Tensor):
        """(int8 codes, fp16 scale [M], fp16 sum [M] or None) of the float32 normed values x, as the fused kernel."""
        x2, with_sum = x.reshape(-1, self.in_features).to(torch.float32), self.fmt == PER_CHANNEL
        if self.engine:
            return qserve_fused_ops.quant_normed(x2, with_sum, approx=True)
        a = numerics_fused.quantize_normed(x2, with_sum=with_sum)
        return (a.codes.to(torch.int8).contiguous(), a.scale.reshape(-1).contiguous(),
                None if a.sum is None else a.sum.reshape(-1).contiguous())

    def _codes(self, x: torch.Tensor):
        """(codes, scale, sum or None) of any input: the fused norm's rule, or the standalone kernel's."""
        if self.act_input == "norm":
            return self._fused(x)
        x2, with_sum = x.reshape(-1, self.in_features).to(torch.float16), self.fmt == PER_CHANNEL
        if self.engine:
            return qserve_fused_ops.quant_engine(x2, with_sum, approx=True)
        return quantize_act(x2, with_sum=with_sum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == W8A8:
            xq, scale, _ = self._codes(x)
            psum = _int_mm(xq, self.weight_q.t())   # exact int32, then QServe's float32 epilogue (numerics.py)
            y = numerics.epilogue_scaled(psum, self.dequant_scale.view(1, -1), scale.view(-1, 1))
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif self.act_input == "norm" or self.engine:
            g = self.group
            xq, scale, ssum = self._codes(x)
            y = gemm(xq, scale, ssum, self.qweight, self.s1_scales, self.s1_szeros if g == 0 else None,
                     self.s2_scales if g else None, self.s2_zeros if g else None, g)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            g = self.group
            y = w4a8_linear(x, self.qweight, self.s1_scales, self.s1_szeros if g == 0 else None,
                            self.s2_scales if g else None, self.s2_zeros if g else None, g)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = (y + self.bias.to(torch.float16).to(x.dtype)).to(torch.float16).to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}" + \
            (", engine kernels" if self.engine else "")


def _tensors(art, name: str, entry: dict) -> dict[str, torch.Tensor]:
    return {t: art.tensors.get(f"{name}.{t}") for t in reference.TENSORS[entry["format"]]}


def build_qserve_cuda_model(art, device: str = "cuda"):
    """The CPU reference model of a QServe artifact (float32, its blocks run as graphs with the KV cache
    quantization in them) on `device`, with every quantized linear replaced by W4A8Linear."""
    from ...runtime.reference import build_model

    model = build_model(art, compute_dtype=torch.float32, device="cpu")
    engine = False
    for mod in model.modules():   # the engine's fused ops (prepare_reference): its MUFU instructions on the GPU
        if isinstance(mod, (reference.QServeNorm, reference.QServeSiLU)):
            mod.engine = engine = True
    for name, entry in art.quantized_layers().items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        n, k = entry["shape"]
        setattr(parent, child, W4A8Linear(entry["format"], _tensors(art, name, entry), n, k, old.bias, device,
                                          getattr(old, "act_input", "quant"), engine=engine))
    return model.to(device)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp16 ulps (units in the last place), through the ordered integer image of the bit patterns."""
    def ordered(t):
        v = t.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
        return torch.where(v >= 0, v, -(v & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


def check_layers_cuda(art, device: str = "cuda", tokens: int = 37, seed: int = 0) -> dict[str, dict]:
    """layer -> {bit_equal: fraction of outputs bit-equal to the CPU reference layer, max_ulp, ok}, on random
    activations (normal, with a few outlier channels). ok: >= 99.9% of outputs within 1 fp16 ulp (the per-token
    sum is exact on the GPU and fp32 on the CPU, so a rare output can differ where it cancels)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, entry in art.quantized_layers().items():
        n, k = entry["shape"]
        t = _tensors(art, name, entry)
        x = torch.randn(tokens, k, generator=gen)
        x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 20.0
        x = x.to(torch.float16).to(torch.float32)
        ref = reference.QServeLinear(entry["format"], t, n, k, None)(x)
        got = W4A8Linear(entry["format"], t, n, k, None, device)(x.to(device)).cpu()
        ulp = ulp_distance(got, ref)
        within = float((ulp <= 1).float().mean())
        out[name] = {"bit_equal": float((ulp == 0).float().mean()), "max_ulp": int(ulp.max()),
                     "ok": bool(torch.isfinite(got).all()) and within >= 0.999}
    return out
