"""Scoring for the passes that search a parameter (smoothing strength, SmoothAttention's alpha): the block's output
error, against the float block, with every quantizable linear fake-quantized to its spec and the target's run-time
activation and KV-cache quantization simulated."""
from __future__ import annotations

import torch

from ..compiler.share import evaluate_split
from ..ir.formats import fake_quantize_fast


def _fake_quant(w: torch.Tensor, lin) -> torch.Tensor:
    return fake_quantize_fast(w.float(), lin.spec, 1.0 if lin.clip is None else lin.clip).to(w.dtype)


class BlockScorer:
    """Block output error with every quantizable linear fake-quantized (cached per linear until its float weight
    changes) and the graph's run-time numerics (dcc:: activation and KV quantization) on, against the float block's
    output."""

    def __init__(self, block, ctx, samples: int):
        self.block, self.ctx, self.samples = block, ctx, samples
        self.lins = {n: l for n, l in block.linears.items() if l.spec is not None}
        self.cache: dict[str, torch.Tensor] = {}
        self.ref = ctx.forward(samples=samples).double()

    def error(self, changed: list[str]) -> float:
        floats = {}
        for n in self.lins:
            mod = self.block.linear_module(n)
            floats[n] = mod.weight.data
            if n in changed or n not in self.cache:
                self.cache[n] = _fake_quant(mod.weight.data, self.lins[n])
            mod.weight.data = self.cache[n]
        try:
            out = self.ctx.forward(simulate=True, samples=self.samples).double()
        finally:
            for n, w in floats.items():
                self.block.linear_module(n).weight.data = w
        return float(((out - self.ref) ** 2).mean())

    def forget(self, names: list[str]) -> None:
        for n in names:
            self.cache.pop(n, None)


def score_candidates(scorer: BlockScorer, params: list[torch.Tensor], changed: list[str], n: int, apply,
                     world=None) -> list[float]:
    """The block error of candidates 0..n-1 of a search: apply(i) changes `params` (the weights of the linears in
    `changed`), the error is scored and the params are restored. With several processes (`world`) each scores every
    size-th candidate (the scorer's probe sequences are the same on all of them) and the errors are shared
    (compiler/share.py evaluate_split)."""
    saved = [p.data.clone() for p in params]

    def error_of(i: int) -> float:
        apply(i)
        err = scorer.error(changed)
        for p, d in zip(params, saved):
            p.data = d.clone()
        return err

    return evaluate_split(world, n, error_of)
