"""CPU reference of QServe's linear layers (research/targets.md 1A): int8 per-token activations, an exact integer
GEMM against the stored codes, and the epilogue in the engine's float32 order (numerics.py) --
per channel: out = fp16(fma(ascale[m], s1[n] * psum, -(s1_szeros[n] * a_ssum[m]))); groups and W8A8:
out = fp16(psum * (s1[n] * ascale[m])), each product rounded to float32 as QServe's fast-math kernels round it.
use_engine_kernels() puts the engine's fused norm + quantization and its SiLU-and-multiply (numerics_fused.py) into
the reference model of a QServe artifact."""
from __future__ import annotations

import torch
from torch import nn

from . import layout, numerics, numerics_fused
from .ops import qserve_norm, qserve_silu

# float32 sums integers exactly below 2^24: |int8 code x weight| <= 127 * 128, so 1024 products per partial sum
# stay exact in any order; partial sums are then added in float64 (exact as well)
_K_CHUNK = 1024


def exact_int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """[T, K] x [N, K]^T of integer-valued float32 tensors, returned exactly as float64 [T, N]."""
    out = None
    for k0 in range(0, xq.shape[1], _K_CHUNK):
        part = (xq[:, k0:k0 + _K_CHUNK] @ wq[:, k0:k0 + _K_CHUNK].T).double()
        out = part if out is None else out + part
    return out


class QServeLinear(nn.Linear):
    """One quantized linear as QServe's W4A8 / W8A8 GEMM computes it (an nn.Linear subclass, so hooks that look for
    nn.Linear still see it). `weight` holds the decoded float32 weight (s1 * w8, or q*s1 - szeros) so that code
    reading module.weight sees the artifact's values. act_input: which kernel quantizes the input -- "quant" (the
    standalone quant kernel, on x rounded to fp16) or "norm" (the fused norm's, on the float32 normed values that a
    QServeNorm returns)."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], n: int, k: int, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = k, n, fmt
        self.act_input = "quant"
        if fmt == "qserve-w8a8":
            ints, s1, szeros = tensors["weight"].to(torch.float32), tensors["dequant_scale"], None
        else:
            qw = tensors["qweight"]
            s1, szeros = tensors["s1_scales"], tensors.get("s1_szeros")
            if fmt == "qserve-w4a8-group":
                ints = layout.int8_codes_g128(qw, tensors["s2_scales"], tensors["s2_zeros"], n, k).to(torch.float32)
            else:
                ints = layout.unpack_qweight(qw, n, k).to(torch.float32)
        self.register_buffer("ints", ints)                                   # codes or w8, integer-valued
        self.register_buffer("s1", s1.to(torch.float64).view(1, -1))
        self.register_buffer("szeros", None if szeros is None else szeros.to(torch.float64).view(1, -1))
        w = ints.double() * self.s1.view(-1, 1)
        if self.szeros is not None:
            w = w - self.szeros.view(-1, 1)
        self.weight = nn.Parameter(w.to(torch.float32), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float32), requires_grad=False)

    def epilogue(self, psum: torch.Tensor, a) -> torch.Tensor:
        """fp16 [T, N] from the exact integer GEMM psum [T, N] and the tokens' int8 quantization `a` (scale, sum):
        QServe's epilogue, the zero point (per channel) subtracted as s1_szeros times the token's fp16 sum."""
        if self.szeros is not None:
            return numerics.epilogue_per_channel(psum, self.s1, self.szeros, a.scale, a.sum)
        return numerics.epilogue_scaled(psum, self.s1, a.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.act_input == "norm":
            a = numerics_fused.quantize_normed(x2.to(torch.float32), with_sum=self.szeros is not None)
        else:
            a = numerics.quantize_tokens(x2)
        out = self.epilogue(exact_int_matmul(a.codes, self.ints), a).to(x.dtype)   # the engine writes fp16
        if self.bias is not None:
            out = (out + self.bias.to(torch.float16).to(x.dtype)).to(torch.float16).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, " \
               f"act_input={self.act_input}"


class QServeNorm(nn.Module):
    """The decoder's input_layernorm / post_attention_layernorm as QServe's rms_norm_general computes it (a layer
    norm without bias: numerics_fused.py): returns the float32 normed values, which the QServeLinears reading them
    (act_input "norm") quantize as the fused kernel does. One dcc::qserve_norm node in the block's graph (ops.py);
    engine=True (set by the GPU runtime): on a GPU, the engine's MUFU instructions."""

    def __init__(self, weight: torch.Tensor, eps: float, engine: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps, self.engine = float(eps), bool(engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qserve_norm(x, self.weight, self.eps, self.engine)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, engine=rms_norm_general" + (" (MUFU)" if self.engine else "")


class QServeSiLU(nn.Module):
    """The SiLU of QServe's silu_and_mul kernel, rounded to fp16 as the kernel rounds it (numerics_fused.silu16). The
    model's `act_fn(gate) * up` then multiplies two fp16 values exactly in float32, and down_proj's quantization
    rounds that product to fp16 first: together the kernel's fp16 output. One dcc::qserve_silu node (ops.py)."""

    def __init__(self, engine: bool = False):
        super().__init__()
        self.engine = bool(engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qserve_silu(x, self.engine)


# QServe's decoder layer (qserve/modeling/models/llama_*_unpad.py) fuses by module: its RMSNormGeneral quantizes the
# inputs of qkv_proj and gate_up_proj (the source model's q/k/v and gate/up projections), SiluAndMulQuant computes
# down_proj's input; the loader (loader_spec.py) requires these names, so the runtime may rely on them.
_NORM_FED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def use_engine_kernels(model: nn.Module) -> int:
    """Make the reference model of a QServe artifact compute the engine's fused ops, in every decoder layer whose
    projections are QServeLinears: each norm becomes a QServeNorm and the linears it feeds quantize with the fused
    kernel's rule; the act_fn before a QServe down_proj becomes QServeSiLU (where the config's hidden_act is silu).
    Call before the model first runs (the blocks' graphs are captured then). Returns the number of modules replaced."""
    replaced = 0
    silu = getattr(getattr(model, "config", None), "hidden_act", None) in ("silu", "swish")
    for _, layer in list(model.named_modules()):
        for norm_name, fed in _NORM_FED.items():
            norm = getattr(layer, norm_name, None)
            lins = [_get(layer, p) for p in fed]
            if norm is None or not all(isinstance(m, QServeLinear) for m in lins) or isinstance(norm, QServeNorm):
                continue
            eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
            setattr(layer, norm_name, QServeNorm(norm.weight, eps))
            for m in lins:
                m.act_input = "norm"
            replaced += 1
        mlp = getattr(layer, "mlp", None)
        if (silu and mlp is not None and isinstance(getattr(mlp, "down_proj", None), QServeLinear)
                and isinstance(getattr(mlp, "act_fn", None), nn.Module) and not isinstance(mlp.act_fn, QServeSiLU)):
            mlp.act_fn = QServeSiLU()
            replaced += 1
    return replaced


def _get(root: nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def decode(tensors, prefix: str, entry: dict) -> torch.Tensor:
    """The float32 weight a QServe layer stands for, decoded from its stored tensors."""
    n, k = entry["shape"]
    fmt = entry["format"]
    if fmt == "qserve-w8a8":
        return layout.decode_w8a8(tensors.get(f"{prefix}.weight"), tensors.get(f"{prefix}.dequant_scale"))
    t = {name: tensors.get(f"{prefix}.{name}") for name in ("qweight", "s1_scales")}
    if fmt == "qserve-w4a8-group":
        return layout.decode_w4a8(t["qweight"], t["s1_scales"], n, k, s2_scales=tensors.get(f"{prefix}.s2_scales"),
                                  s2_zeros=tensors.get(f"{prefix}.s2_zeros"))
    return layout.decode_w4a8(t["qweight"], t["s1_scales"], n, k, s1_szeros=tensors.get(f"{prefix}.s1_szeros"))


TENSORS = {"qserve-w8a8": ("weight", "dequant_scale"),
           "qserve-w4a8-per-channel": ("qweight", "s1_scales", "s1_szeros"),
           "qserve-w4a8-group": ("qweight", "s1_scales", "s2_scales", "s2_zeros")}
