"""Fold every norm's gain (and LayerNorm bias) into the linears that read it, leaving the norm with unit gain, as
QuaRot/SliceGPT do before rotating; the epilogue folds the final norm into the head. Function-preserving."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..ir.rewrite import add_linear_bias
from ._model_parts import find_final_norm, norm_offset, untie_head
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class FuseNormsConfig(PassConfig):
    """verify: run the block before and after and raise if its output moved beyond rounding noise (e.g. a norm
    whose output also feeds something that is not a linear). Example: FuseNormsConfig(verify=False)."""
    verify: bool = True

    def __post_init__(self):
        if not isinstance(self.verify, bool):
            raise ValueError(f"fuse_norms: verify must be a bool, got {self.verify!r}")


def _add_bias(mod: nn.Linear, extra: torch.Tensor) -> bool:
    """bias += extra (float64 math); creates the bias if the linear had none. Returns whether one was created."""
    created = mod.bias is None
    if created:
        mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device),
                                requires_grad=False)
    mod.bias.data = (mod.bias.data.double() + extra).to(mod.bias.dtype)
    return created


@torch.no_grad()
def fold_norm(block, g) -> dict | None:
    """y = (offset + w) * n(x) + b read by W: W <- W diag(offset + w), bias <- bias + W b; w = 1 - offset, b = 0."""
    gain = block.param(g.weight).data.double() + g.offset if g.weight is not None else None
    bias = block.param(g.bias).data.double() if g.bias is not None else None
    if (gain is None or bool((gain == 1).all())) and (bias is None or not bool(bias.any())):
        return None   # nothing to fold (already fused, or a norm without parameters)
    created = []
    for name in g.linears:
        mod = block.linear_module(name)
        w = mod.weight.data.double()
        size = (gain if gain is not None else bias).shape[0]
        if w.shape[1] != size:
            raise ValueError(f"fuse_norms: {name} has {w.shape[1]} inputs but norm {g.norm} has {size} channels")
        if bias is not None:   # uses the weight before the gain is folded: W (n*gain + b) = (W diag gain) n + W b
            if _add_bias(mod, w @ bias.to(w.device)):
                block.linears[name].has_bias = True
                created.append(name)
        if gain is not None:
            w = w * gain.to(w.device).view(1, -1)
        mod.weight.data = w.to(mod.weight.dtype)
    if g.weight is not None:
        block.param(g.weight).data.fill_(1.0 - g.offset)   # offset + w == 1
    if g.bias is not None:
        block.param(g.bias).data.zero_()
    return {"readers": list(g.linears), "offset": g.offset, "bias_folded": bias is not None,
            "bias_created": created}


@register
class FuseNorms(Pass):
    Config = FuseNormsConfig
    preserves_function = True   # checked by the pass manager (verify, or --debug)
    ensures = ("norms_fused",)
    forbids = ("clipped", "quantized")   # it changes weights: ranges and codes taken before it would be stale

    def run(self, block, config, ctx) -> PassResult:
        details = {}
        for g in block.norms:
            if not g.exclusive:   # post-norm: the residual add reads the norm's output too
                ctx.log(f"fuse_norms: kept {g.norm}: its output also feeds the residual stream (post-norm), so its "
                        f"gain cannot move into {g.linears}")
                continue
            d = fold_norm(block, g)
            if d is not None:
                details[g.norm] = d
                for name in d["bias_created"]:   # the graph reads the new bias parameter from now on
                    ctx.rewrite(partial(add_linear_bias, path=name))
        folded = list(details)
        return PassResult(bool(folded), f"folded {len(folded)} norm(s) into their readers", details,
                          facts=self.ensures)

    @torch.no_grad()
    def model_epilogue(self, lm, config, ctx) -> PassResult | None:
        """Fold the final norm into the head. A LayerNorm bias b goes into the head's bias if it has one; otherwise
        it stays in the norm as b / gain (exact, and the head keeps the architecture's bias-free shape)."""
        head = lm.model.get_output_embeddings()
        if head is None:   # an encoder's base model: its last block's output is the model's output
            ctx.log("fuse_norms: the model has no output head, nothing to fold the final norm into")
            return PassResult(False, "no output head")
        found = find_final_norm(lm)
        if found is None:
            ctx.log("fuse_norms: no final norm before the head, nothing to fold")
            return PassResult(False, "no final norm")
        name, norm = found
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if weight is None:
            return PassResult(False, f"final norm {name} has no gain")
        offset = norm_offset(norm, weight.shape[0])
        gain = weight.data.double() + offset
        b = bias.data.double() if bias is not None else None
        if bool((gain == 1).all()) and (b is None or not bool(b.any())):
            return PassResult(False, f"final norm {name} already has unit gain")
        head = untie_head(lm)
        w = head.weight.data.double()
        where = "none"
        if b is not None and bool(b.any()):
            if head.bias is not None or bool((gain == 0).any()):
                _add_bias(head, w @ b.to(w.device))
                bias.data.zero_()
                where = "head bias"
            else:
                bias.data = (b / gain).to(bias.dtype)   # (gain n + b) = gain (n + b / gain)
                where = "kept in the norm as b / gain"
        head.weight.data = (w * gain.to(w.device).view(1, -1)).to(head.weight.dtype)
        weight.data.fill_(1.0 - offset)   # offset + w == 1
        return PassResult(True, f"folded final norm {name} into the head", {"norm": name, "bias": where})
