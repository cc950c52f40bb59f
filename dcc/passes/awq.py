"""AWQ scale search (Lin et al., 2024): per smoothing group, s = mean|x|^a (optionally / mean|w|^(1-a)), chosen on a
grid by the output error of the group's fake-quantized consumers, then absorbed into the producer (norm or linear)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.share import evaluate_split
from ..ir.formats import fake_quantize_fast
from ._scaling import apply_scale, scale_groups
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class AwqConfig(PassConfig):
    """grid: number of exponents a in [0, 1) tried; patterns: "x" for s = x^a (the paper's, DeepCompressor's
    beta = 0) and/or "duo" for s = x^a / w^(1-a) (AutoAWQ's duo scaling), each group taking the best candidate of all;
    max_tokens: calibration tokens used to score a candidate (the statistics use all of them)."""
    grid: int = 20
    patterns: tuple[str, ...] = ("duo",)
    max_tokens: int = 512

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns or set(self.patterns) - {"x", "duo"}:
            raise ValueError(f"awq: patterns must be a non-empty subset of ('x', 'duo'), got {self.patterns}")
        if self.grid < 1:
            raise ValueError(f"awq: grid must be >= 1, got {self.grid}")
        if self.max_tokens < 16:
            raise ValueError(f"awq: max_tokens must be >= 16, got {self.max_tokens}")


def _candidates(x_stat: torch.Tensor, w_stat: torch.Tensor, grid: int, patterns: tuple[str, ...]):
    yield 0.0, 0.0, torch.ones_like(x_stat)   # s = 1: plain quantization, the baseline every candidate must beat
    for i in range(1, grid):
        a = i / grid
        if "x" in patterns:
            yield a, 0.0, x_stat.pow(a)
        if "duo" in patterns:
            yield a, 1 - a, x_stat.pow(a) / w_stat.pow(1 - a).clamp(min=1e-4)


@torch.no_grad()
def group_statistics(ctx, g, config: AwqConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tokens a candidate is scored on, mean |x| per channel in float64) of group g's input over the whole
    calibration batch (compiler/stats.py): an evenly spaced subset of max_tokens tokens (the windows are consecutive
    text; a prefix would see one), and the channel means over every token."""
    x = ctx.inputs(g.consumers[0])
    t = ctx.stats.tokens(x)
    xs = ctx.stats.rows(x, torch.linspace(0, t - 1, min(config.max_tokens, t)).long())
    mean = ctx.stats.tree(x, lambda v: v.abs().sum(0, dtype=torch.float64)) / t
    return xs, mean


@torch.no_grad()
def search_group(block, g, xs: torch.Tensor, x_mean: torch.Tensor, config: AwqConfig, world=None):
    """Best producer-channel scale for group g scored on tokens xs [T, K] of inputs whose channels have mean
    magnitude x_mean [K]; returns (s, a, b, loss, loss at s=1). With several processes (`world`) each scores every
    size-th candidate and the losses are shared: the same numbers, so the same choice."""
    lins = [block.linears[c] for c in g.consumers if block.linears[c].spec is not None]
    ws = [block.linear_module(l.name).weight.data.float() for l in lins]
    x_stat = g.collapse(x_mean)
    # weight statistic: mean over consumers of |w| normalised per group of input features (AWQ's w_mean)
    w_stat = g.collapse(torch.stack([(w.abs() / w.abs().amax(1, keepdim=True).clamp(min=1e-8)).mean(0)
                                     for w in ws]).mean(0).double())
    cands = []
    for a, b, s in _candidates(x_stat.clamp(min=1e-8), w_stat.clamp(min=1e-8), config.grid, config.patterns):
        s = s.clamp(min=1e-4)
        cands.append((a, b, s / (s.max() * s.min()).sqrt()))   # AWQ's normalisation keeps scales around 1

    def loss_of(j: int) -> float:
        sc = g.expand(cands[j][2]).float()
        loss = 0.0
        for l, w in zip(lins, ws):
            dw = fake_quantize_fast(w * sc, l.spec) / sc - w
            loss += float((xs @ dw.T).pow(2).mean())
        return loss

    losses = evaluate_split(world, len(cands), loss_of)   # every candidate's loss, on every rank
    best = None
    for j, (a, b, s) in enumerate(cands):   # in candidate order: the first of equal losses wins
        if best is None or losses[j] < best[3]:
            best = (s, a, b, losses[j])
    return (*best, losses[0])


@register
class Awq(Pass):
    Config = AwqConfig
    uses_activations = True
    preserves_function = True   # scales folded into the producers; checked by the pass manager under --debug
    ensures = ("smoothed",)
    forbids = ("clipped", "quantized")   # it changes weights: ranges and codes taken before it would be stale

    def run(self, block, config, ctx) -> PassResult:
        groups, skipped = scale_groups(block)
        for s in skipped:
            ctx.log(f"awq: skipped {s}")
        details, changed = {}, False
        for g in groups:
            s, a, b, loss, base = search_group(block, g, *group_statistics(ctx, g, config), config, ctx.world)
            if a > 0.0:
                apply_scale(block, g, s)
                ctx.rescale_inputs(g.consumers, g.expand(s).float())   # the consumers now read x / s
                changed = True
            details[f"{g.producer}->{','.join(g.consumers)}"] = {
                "alpha": round(a, 3), "beta": round(b, 3), "loss": loss, "loss_rtn": base,
                "gain": round(base / loss, 3) if loss > 0 else None}
        msg = f"{len(groups)} groups scaled" + (f", {len(skipped)} skipped" if skipped else "")
        # function-preserving, and the cached inputs were rescaled exactly: no need to run the block again
        return PassResult(changed, msg, {"groups": details, "skipped": skipped}, keep_activations=True)
