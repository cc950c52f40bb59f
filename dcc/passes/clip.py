"""Weight range clipping (AWQ's clip search): per output row and group, the shrink ratio of the quantization range
that minimises the group's output error ||(Q_r(W_g) - W_g) x_g||^2, scored exactly with each group's Gram matrix
(or, for groups wider than the token count, e.g. per channel, with the tokens themselves)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.share import owners
from ..ir.formats import fake_quantize_fast
from .base import Pass, PassConfig, PassResult, quantizable, register


@dataclass(frozen=True)
class ClipConfig(PassConfig):
    """grid: ratios 1, 1 - (1-min_ratio)/grid, ..., min_ratio (+1/grid); skip_qk: leave q and k unclipped, as AWQ
    does, because their error shows in attention scores that this objective does not see; asymmetric: for
    asymmetric specs, then refine the min and the max ratio separately (one coordinate pass each); max_tokens: score
    on this many evenly spaced calibration tokens (None: all)."""
    grid: int = 20
    min_ratio: float = 0.5
    skip_qk: bool = True
    asymmetric: bool = True
    max_tokens: int | None = None

    def __post_init__(self):
        if self.grid < 1:
            raise ValueError(f"clip: grid must be >= 1, got {self.grid}")
        if not 0.0 < self.min_ratio < 1.0:
            raise ValueError(f"clip: min_ratio must be in (0, 1), got {self.min_ratio}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"clip: max_tokens must be None or an int >= 1, got {self.max_tokens!r}")


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec, config: ClipConfig):
    """[N, G] clip ratios for weight w [N, K] on inputs x [T, K]; returns (ratios, error before, error after)."""
    n, k = w.shape
    gs = k if spec.group_size <= 0 else spec.group_size
    g = k // gs
    if config.max_tokens and x.shape[0] > config.max_tokens:   # evenly spaced tokens (every sequence, all positions)
        x = x[torch.linspace(0, x.shape[0] - 1, config.max_tokens, device=x.device).long()]
    xg = x.view(-1, g, gs)
    t = x.shape[0]
    # ||d_g x_g||^2 / T per (row, group), exactly: through the Gram matrix (N*K*gs per candidate) when groups are
    # small, through the tokens themselves (N*K*T) when a group is wider than the token count (per channel)
    gram = torch.einsum("tgi,tgj->gij", xg, xg) / t if gs <= t else None          # [G, gs, gs]
    ratios = [1.0 - i * (1.0 - config.min_ratio) / config.grid for i in range(config.grid)]

    def error(clip):
        d = (fake_quantize_fast(w, spec, clip) - w).view(n, g, gs)
        if gram is not None:
            return torch.einsum("ngi,gij,ngj->ng", d, gram, d)
        return torch.einsum("ngi,tgi->ngt", d, xg).pow(2).sum(-1) / t

    base = best_err = error(1.0)
    if spec.group_size < 0:   # one range for the whole tensor: the best common ratio
        errs = [(float(error(r).sum()), r) for r in ratios]
        e, r = min(errs)
        return torch.full((1, 1), r, device=w.device), float(base.sum()), e
    best = torch.ones(n, g, 2, device=w.device)                                         # (min ratio, max ratio) per (row, group)
    sweeps = [(0, 1)] + ([(0,), (1,)] if config.asymmetric and not spec.symmetric else [])
    for ends in sweeps:   # both ends together, then each end alone with the other at its best
        for r in ratios[1:]:
            cand = best.clone()
            for e in ends:
                cand[..., e] = r
            err = error(cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(-1), cand, best)
    if not (config.asymmetric and not spec.symmetric):
        best = best[..., 1]
    return best, float(base.sum()), float(best_err.sum())


def scored_inputs(ctx, linear: str, max_tokens: int | None) -> torch.Tensor:
    """The calibration tokens search_clip scores on: max_tokens evenly spaced ones of the whole batch (every
    sequence, all positions), or all of them, gathered from wherever the batch is held (compiler/stats.py)."""
    x = ctx.inputs(linear)
    t = ctx.stats.tokens(x)
    if max_tokens and t > max_tokens:
        return ctx.stats.rows(x, torch.linspace(0, t - 1, max_tokens).long())
    return ctx.stats.rows(x)


@register
class Clip(Pass):
    Config = ClipConfig
    ensures = ("clipped",)
    forbids = ("quantized",)   # ranges are for the quantizer that follows
    uses_activations = True

    def run(self, block, config, ctx) -> PassResult:
        skip = {n for a in block.attentions for n in (a.q, a.k)} if config.skip_qk else set()
        details = {}
        lins = [lin for lin in quantizable(block) if lin.name not in skip]
        # every process gathers every linear's scored tokens (collectives, in order); with several processes each
        # linear's search runs on one of them (the same numbers anywhere) and its ratios are shared
        ws = [block.linear_module(lin.name).weight for lin in lins]
        owner = owners([float(w.numel()) for w in ws], ctx.world.size)
        found = {}
        for j, (lin, w) in enumerate(zip(lins, ws)):
            x = scored_inputs(ctx, lin.name, config.max_tokens)
            if owner[j] == ctx.world.rank:
                found[j] = search_clip(w.data.float(), x, lin.spec, config)
        if ctx.world.distributed:   # (ratios on the CPU, error before, after) from each linear's owner
            found = {j: ctx.world.broadcast_object((found[j][0].cpu(), *found[j][1:]) if j in found else None,
                                                   src=owner[j]) for j in range(len(lins))}
        for j, lin in enumerate(lins):
            ratios, before, after = found[j]
            lin.clip = ratios.to(ws[j].device)
            details[lin.name] = {"mean_ratio": round(float(ratios.float().mean()), 4),
                                 "err_reduction": round(before / after, 3) if after > 0 else None}
        # clip ratios only change how later quantization rounds; the float weights are untouched
        return PassResult(False, f"clip ratios for {len(details)} linears", details)
