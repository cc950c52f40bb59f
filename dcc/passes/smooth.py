"""SmoothQuant (Xiao et al., 2023): per smoothing group, s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) moves the
activation outliers of x into the consumers' weights; s is absorbed into the producer (norm or linear).
Function-preserving."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._model_parts import call_block, check_preserved
from ._scaling import apply_scale, scale_groups
from .base import Pass, PassConfig, PassResult, register

GROUP_KINDS = ("norm", "vo", "mlp")


@dataclass(frozen=True)
class SmoothConfig(PassConfig):
    """alpha: migration strength in [0, 1] (0: s = 1 / max|W|, 1: s = max|x|); groups: which kinds of producer ->
    consumers groups to smooth ("norm": norm -> q/k/v or up/gate, "vo": v_proj -> o_proj, "mlp": up -> down);
    verify: check that the block's output is unchanged. Example: SmoothConfig(alpha=0.85, groups=("norm",))."""
    alpha: float = 0.5
    groups: tuple[str, ...] = GROUP_KINDS
    verify: bool = True

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))   # a YAML list becomes a tuple
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth: alpha must be in [0, 1], got {self.alpha!r}")
        unknown = [g for g in self.groups if g not in GROUP_KINDS]
        if unknown or not self.groups:
            raise ValueError(f"smooth: groups must be a non-empty subset of {GROUP_KINDS}, got {self.groups!r}")


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x^alpha / w^(1 - alpha), both statistics and s clamped at 1e-5 (dead channels would give 0 or inf)."""
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


@register
class Smooth(Pass):
    Config = SmoothConfig
    uses_activations = True
    ensures = ("smoothed",)

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        groups, skipped = scale_groups(block, need_spec=False)
        for s in skipped:
            ctx.log(f"smooth: skipped {s}")
        groups = [g for g in groups if g.kind in config.groups]
        if not groups:
            return PassResult(False, "no group to smooth", {"skipped": skipped})
        ref = call_block(block, ctx) if config.verify else None
        # A group's input is its producer's output, which only that group's scaling changes (the others preserve
        # the function), so every statistic can be read from one collection before any group is scaled.
        x_max = {g.producer: ctx.inputs(g.consumers[0]).abs().amax(0).double() for g in groups}
        details = {}
        for g in groups:
            w_max = torch.stack([block.linear_module(c).weight.data.abs().amax(0).double() for c in g.consumers])
            x = g.collapse(x_max[g.producer].to(w_max.device))
            s = smooth_scale(x, g.collapse(w_max.amax(0)), config.alpha)
            apply_scale(block, g, s)
            details[f"{g.producer}->{','.join(g.consumers)}"] = {
                "kind": g.kind, "s_min": float(s.min()), "s_max": float(s.max()),
                "x_absmax": float(x.max()), "x_absmax_after": float((x / s).max())}
        ctx.invalidate()
        if ref is not None:
            details["output_rel_err"] = check_preserved(ref, call_block(block, ctx), f"smooth on block {block.prefix}")
        msg = f"{len(groups)} groups smoothed (alpha {config.alpha})" + (f", {len(skipped)} skipped" if skipped else "")
        return PassResult(True, msg, {"groups": details, "skipped": skipped}, facts=self.ensures)
