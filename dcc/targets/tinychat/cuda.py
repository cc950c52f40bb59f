"""Run a TinyChat artifact on the GPU: its linears execute through dcc's W4A16 kernels (csrc/w4a16; no decoded
weights kept), everything else runs in the artifact's 16-bit dtype. Also the GPU side of `dcc validate`'s check."""
from __future__ import annotations

import torch

from ...runtime.cuda.ops import dequantize, w4a16_linear
from .emit import FORMAT


class W4A16Linear(torch.nn.Linear):
    """A Linear whose weight is TinyChat qweight/scales/scaled_zeros on the GPU (an nn.Linear subclass, so hooks that
    look for nn.Linear still see it)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = qweight.shape[1], 4 * qweight.shape[0]
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("scaled_zeros", scaled_zeros)
        self.weight = None
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(x.to(self.scales.dtype), self.qweight, self.scales, self.scaled_zeros, self.group_size,
                            self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class _NoDecode:
    """An Artifact whose decode() returns an uninitialised placeholder: the quantized linears are replaced anyway."""

    def __init__(self, art):
        self._art = art

    def __getattr__(self, name):
        return getattr(self._art, name)

    def decode(self, layer: str) -> torch.Tensor:
        n, k = self._art.manifest["layers"][layer]["shape"]
        return torch.empty(n, k, dtype=self._art.dtype)


def _layer_tensors(art, name: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    entry = art.manifest["layers"][name]
    if entry.get("format") != FORMAT:
        raise ValueError(f"{art.path}: layer {name} has format {entry.get('format')!r}; the CUDA runtime runs "
                         f"{FORMAT} only")
    t = [art.tensors.get(f"{name}.{k}").to(device) for k in ("qweight", "scales", "scaled_zeros")]
    return t[0], t[1], t[2], int(entry["spec"]["group_size"])


def build_cuda_model(art, device: str = "cuda"):
    """The artifact's model on `device` in art.dtype, with W4A16Linear layers."""
    from ...runtime.reference import build_model

    model = build_model(_NoDecode(art), compute_dtype=art.dtype, device=device)
    for name in art.quantized_layers():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        qw, s, sz, g = _layer_tensors(art, name, device)
        bias = None if old.bias is None else old.bias.detach().to(device=device, dtype=art.dtype)
        setattr(parent, child, W4A16Linear(qw, s, sz, g, bias))
    return model


def check_exact_cuda(art, device: str = "cuda") -> dict[str, bool]:
    """layer -> the GPU-dequantised weight equals the compile-time fake-quant weight, bit for bit."""
    from ..artifact import sha256_tensor

    out = {}
    for name, entry in art.quantized_layers().items():
        qw, s, sz, g = _layer_tensors(art, name, device)
        w = dequantize(qw, s, sz, g, qw.shape[1]).cpu().to(art.dtype)
        out[name] = sha256_tensor(w) == entry.get("weight_sha256")
    return out
