"""Run a dcc artifact on the GPU through its target's CUDA linear (dcc.targets.<name>.cuda, found through the
target registry), and the GPU counterparts of dcc.runtime.validate's checks, for `dcc validate --device cuda`."""
from __future__ import annotations

import torch

from ...targets.base import get_target


def build_cuda_model(art, device: str = "cuda"):
    """The artifact's model on `device`, every quantized linear executed by dcc's kernels."""
    return get_target(art.manifest["target"]).cuda_model(art, device)


def check_exact_cuda(art, device: str = "cuda", kernels: dict | None = None) -> dict[str, bool]:
    """layer -> the GPU layer stands for exactly the compile-time fake-quant weight (per-layer kernel figures go into
    `kernels` where the target measures them)."""
    return get_target(art.manifest["target"]).check_exact_cuda(art, device, kernels)


def compare_with_float_cuda(art, float_model, ids: torch.Tensor, device: str = "cuda") -> dict:
    """dcc.runtime.validate.compare_with_float with the artifact running on the GPU kernels (float model on CPU)."""
    from ..validate import compare_with_float
    return compare_with_float(art, float_model, ids, qmodel=build_cuda_model(art, device))
