"""Split each linear that reads a last-axis concatenation into one linear per concatenated input (ir/rewrite_split.py):
linear(cat([a, b], -1), W, bias) -> linear(a, W[:, :Da]) + linear(b, W[:, Da:], bias). Later passes then give each
part its own smoothing, low-rank branch and activation quantization, as an engine that stores the parts apart
computes them (Nunchaku's FLUX single block: proj_out -> out_proj + mlp_fc2). Function-preserving (float rounding of
the sum aside)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..ir.rewrite_split import concat_fed, split_concat_linear, split_paths
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class SplitConcatLinearConfig(PassConfig):
    """only: the linear paths (inside the block) to split; empty: every linear that reads a last-axis concatenation.
    Example: SplitConcatLinearConfig(only=("proj_out",))."""
    only: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.only, list):
            object.__setattr__(self, "only", tuple(self.only))
        if not isinstance(self.only, tuple) or not all(isinstance(p, str) for p in self.only):
            raise ValueError(f"split_concat_linear: only must be a tuple of linear paths, got {self.only!r}")


def split_block(block, rewrite: Callable, only=()) -> dict[str, list[str]]:
    """Split the block's concatenation-fed linears (those in `only`, if given): new nn.Linear modules beside each
    (weights = the column slices, the bias on the last part), the block's IR linears replaced by the parts (each
    inheriting the original's spec, activation format and skip reason), and the graph rewritten through `rewrite`
    (fn(gm): BlockContext.rewrite, which records it for the block's other captures). The original module stays (its
    class's forward still calls it) but the graph no longer reads it. Returns {original: [parts]}."""
    fed = concat_fed(block.gm)
    todo = [p for p in fed if not only or p in only]
    missing = [p for p in only if p not in fed]
    if missing:
        raise ValueError(f"block {block.prefix}: {missing[0]} does not read a last-axis concatenation")
    done = {}
    for path in todo:
        lin, mod = block.linears[path], block.linear_module(path)
        names = split_paths(path, len(fed[path]))
        parent_path, _, _ = path.rpartition(".")
        parent = block.module.get_submodule(parent_path) if parent_path else block.module
        start, new = 0, {}
        for i, (name, width) in enumerate(zip(names, fed[path])):
            last = i == len(names) - 1
            part = torch.nn.Linear(width, mod.out_features, bias=last and mod.bias is not None,
                                   device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(mod.weight[:, start:start + width])
                if part.bias is not None:
                    part.bias.copy_(mod.bias)
            setattr(parent, name.rpartition(".")[2], part)
            new[name] = replace(lin, name=name, in_features=width, has_bias=part.bias is not None, stats={})
            start += width
        rewrite(lambda gm, path=path: split_concat_linear(gm, path))
        # the parts take the original's place in the block's (ordered) linears
        block.linears = {k2: v2 for k, v in block.linears.items()
                         for k2, v2 in (new.items() if k == path else [(k, v)])}
        done[path] = names
    return done


@register
class SplitConcatLinear(Pass):
    Config = SplitConcatLinearConfig
    preserves_function = True
    ensures = ("split_concat",)
    forbids = ("lowrank", "smoothed", "quantized")   # the parts must be smoothed and quantized on their own

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        done = split_block(block, ctx.rewrite, config.only)
        if not done:
            return PassResult(False, "no linear reads a last-axis concatenation: nothing to split")
        return PassResult(True, "; ".join(f"{k} -> {' + '.join(v)}" for k, v in done.items()),
                          {k: v for k, v in done.items()}, facts=self.ensures)

