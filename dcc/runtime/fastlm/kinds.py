"""What a target gives the fast decoder (Target.fast_decoder): the formats of its linears and how to load them, the
16-bit dtype its kernels compute in, and whether (and how) its engine fuses the norm with the activation
quantization. The decoder itself names no target; each target's kind lives in its folder
(dcc/targets/tinychat/fastlm.py, dcc/targets/qserve/fastlm.py)."""
from __future__ import annotations

import torch


class FastKind:
    """One target's part of the fast decoder. formats: the layer formats it loads; row_block: the rows a layout
    stores together (projections reading one input concatenate along N only in whole blocks)."""
    formats: tuple[str, ...] = ()
    row_block: int = 1

    def gpu_dtype(self, art) -> torch.dtype:
        """The activations' 16-bit dtype on a GPU."""
        return art.dtype

    def engine(self, art) -> bool:
        """Whether the artifact runs its engine's fused norm + quantization and SiLU (norm_quant, silu_mul)."""
        return False

    def load(self, art, names: list[str], fmt: str, device, dtype: torch.dtype):
        """One linear computing the layers `names` (same format; outputs concatenated along N)."""
        raise NotImplementedError

    def load_glu(self, art, gate: str, up: str, device, dtype: torch.dtype):
        """A callable x -> SiLU(x Wg^T) * (x Wu^T) as one GEMM with SwiGLU in its epilogue, or None where the kind
        has none for these layers (the decoder then runs the gate_up GEMM and silu_mul)."""
        return None

    def norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float, with_sum: bool, approx: int):
        raise NotImplementedError(f"{type(self).__name__} has no fused norm")

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, approx: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no fused SiLU")


def kind_of(art) -> FastKind | None:
    """The fast decoder's kind of the artifact's target (None: the target has none)."""
    from ...targets.base import TargetError, get_target
    try:
        return get_target(art.manifest.get("target")).fast_decoder()
    except TargetError:   # a target this dcc does not know
        return None
