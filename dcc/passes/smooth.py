"""SmoothQuant (Xiao et al., 2023): per smoothing group, s_j = max|x_j|^alpha / max|W_:,j|^beta moves the activation
outliers of x into the consumers' weights; s is absorbed into the producer (norm or linear) found by the dataflow
analysis. alpha/beta are given, or searched per group on the block's output error with the weights, activations and
KV cache quantized as the target runs them (as DeepCompressor's grid search). Function-preserving in float."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._scoring import BlockScorer, score_candidates
from ._scaling import apply_scale, scale_groups
from .base import Pass, PassConfig, PassResult, register

GROUP_KINDS = ("norm", "vo", "mlp")


@dataclass(frozen=True)
class SmoothConfig(PassConfig):
    """alpha: migration strength in [0, 1] (0: s = 1 / max|W|^beta, 1: s = max|x|); beta: weight exponent (None:
    1 - alpha, SmoothQuant's rule); groups: which producer -> consumers groups to smooth ("norm": norm -> q/k/v or
    up/gate, "vo": v_proj -> o_proj, "mlp": up -> down); search: instead of alpha, try alpha = 0, 1/grid, ...,
    (grid - 1)/grid (beta = 1 - alpha, or the given beta) and no smoothing, and keep per group the one with the
    smallest block output error, measured on `samples` calibration sequences with quantized weights (the
    linears' specs) and the target's run-time activation/KV quantization; verify: check that the float block's
    output is unchanged. Example: SmoothConfig(alpha=0.85, groups=("norm",)) or SmoothConfig(search=True)."""
    alpha: float = 0.5
    beta: float | None = None
    groups: tuple[str, ...] = GROUP_KINDS
    search: bool = False
    grid: int = 10
    samples: int = 4
    verify: bool = True

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))   # a YAML list becomes a tuple
        for f in ("alpha",) + (("beta",) if self.beta is not None else ()):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"smooth: {f} must be in [0, 1], got {v!r}")
        unknown = [g for g in self.groups if g not in GROUP_KINDS]
        if unknown or not self.groups:
            raise ValueError(f"smooth: groups must be a non-empty subset of {GROUP_KINDS}, got {self.groups!r}")
        if not isinstance(self.grid, int) or self.grid < 1 or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"smooth: grid and samples must be ints >= 1, got {self.grid!r}, {self.samples!r}")

    def exponents(self, alpha: float) -> tuple[float, float]:
        return alpha, (1.0 - alpha) if self.beta is None else self.beta


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float, beta: float | None = None) -> torch.Tensor:
    """s = x^alpha / w^beta (beta defaults to 1 - alpha), both statistics and s clamped at 1e-5 (dead channels would
    give 0 or inf)."""
    beta = 1.0 - alpha if beta is None else beta
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(beta)
    return s.clamp(min=1e-5)


def _group_params(block, g) -> list[torch.Tensor]:
    """The tensors apply_scale changes for group g (saved and restored around each search candidate)."""
    ps = [block.linear_module(c).weight for c in g.consumers]
    if g.kind == "norm":
        ng = next(n for n in block.norms if n.norm == g.producer)
        ps += [block.param(p) for p in (ng.weight, ng.bias) if p is not None]
    else:
        prod = block.linear_module(g.producer)
        ps += [p for p in (prod.weight, prod.bias) if p is not None]
    return ps


@register
class Smooth(Pass):
    Config = SmoothConfig
    uses_activations = True
    preserves_function = True   # checked by the pass manager (verify, or --debug)
    ensures = ("smoothed",)
    forbids = ("clipped", "quantized")   # it changes weights: ranges and codes taken before it would be stale

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        groups, skipped = scale_groups(block, need_spec=False)
        for s in skipped:
            ctx.log(f"smooth: skipped {s}")
        groups = [g for g in groups if g.kind in config.groups]
        if not groups:
            return PassResult(False, "no group to smooth", {"skipped": skipped})
        # A group's input is its producer's output, which only that group's scaling changes (the others preserve
        # the function), so every statistic can be read from one collection before any group is scaled.
        x_max = {g.producer: ctx.stats.absmax(ctx.inputs(g.consumers[0])).double() for g in groups}
        scorer = BlockScorer(block, ctx, config.samples) if config.search else None
        details = {}
        for g in groups:
            w_max = torch.stack([block.linear_module(c).weight.data.abs().amax(0).double() for c in g.consumers])
            x = g.collapse(x_max[g.producer].to(w_max.device))
            w_c = g.collapse(w_max.amax(0))
            alpha, err = config.alpha, None
            if scorer is not None:
                alpha, err = self._search(block, g, x, w_c, config, scorer, ctx.world)
            if alpha is None:   # no smoothing won the search
                details[f"{g.producer}->{','.join(g.consumers)}"] = {"kind": g.kind, "alpha": None, "error": err}
                continue
            s = smooth_scale(x, w_c, *config.exponents(alpha))
            apply_scale(block, g, s)
            # the consumers now read x / s (exactly, in real arithmetic: the producer's channels are divided by s
            # and, for v -> o and up -> down, attention and the gating are linear in them): the cached inputs are
            # divided instead of collected again by another run of the block
            ctx.rescale_inputs(g.consumers, g.expand(s).float())
            if scorer is not None:
                scorer.forget([g.producer] + g.consumers)
            details[f"{g.producer}->{','.join(g.consumers)}"] = {
                "kind": g.kind, "alpha": alpha, "beta": config.exponents(alpha)[1], "error": err,
                "s_min": float(s.min()), "s_max": float(s.max()),
                "x_absmax": float(x.max()), "x_absmax_after": float((x / s).max())}
        chosen = [d["alpha"] for d in details.values() if isinstance(d, dict) and "alpha" in d]
        how = f"alpha searched: {chosen}" if config.search else f"alpha {config.alpha}"
        msg = f"{len(groups)} groups smoothed ({how})" + (f", {len(skipped)} skipped" if skipped else "")
        return PassResult(True, msg, {"groups": details, "skipped": skipped}, facts=self.ensures,
                          keep_activations=True)

    @staticmethod
    def _search(block, g, x, w_c, config, scorer, world=None) -> tuple[float | None, float]:
        """(best alpha or None for no smoothing, its error): each candidate is applied, scored and undone; with
        several processes (`world`) each scores every size-th candidate (the scorer's probe sequences are the same
        on all of them) and the errors are shared."""
        changed = [g.producer] + g.consumers
        best = (scorer.error(changed), None)

        def apply(i: int) -> None:
            apply_scale(block, g, smooth_scale(x, w_c, *config.exponents(i / config.grid)))

        errs = score_candidates(scorer, _group_params(block, g), changed, config.grid, apply, world)
        for i, err in enumerate(errs):   # in order: ties keep the earlier
            best = min(best, (err, i / config.grid), key=lambda t: t[0])
        scorer.forget(changed)
        return best[1], round(best[0], 9)
