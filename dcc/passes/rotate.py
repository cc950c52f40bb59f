"""QuaRot-style rotation (Ashkboos et al., 2024): the residual stream h becomes h R for an orthogonal R (Hadamard by
default), which spreads activation outliers over all channels; optionally a per-head rotation between v and o.
Function-preserving only after fuse_norms (RMSNorm with unit gain commutes with R), so list fuse_norms first."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ir.hadamard import ROTATION_KINDS, rotation_matrix
from ._model_parts import (call_block, check_preserved, commutes_with, find_final_norm, trace_outside_blocks,
                           untie_head)
from .base import Pass, PassConfig, PassResult, register


@dataclass(frozen=True)
class RotateConfig(PassConfig):
    """kind: "hadamard" (deterministic), "random_hadamard" (Hadamard with random column signs) or "random" (Haar
    orthogonal, any size); seed: for the random kinds; heads: also rotate each attention head's values (v_proj rows
    and o_proj columns) by a head_dim rotation; verify: check every block (and the embeddings) numerically.
    Example: RotateConfig(kind="random_hadamard", seed=1). The pipeline must run fuse_norms before rotate."""
    kind: str = "hadamard"
    seed: int = 0
    heads: bool = True
    verify: bool = True

    def __post_init__(self):
        if self.kind not in ROTATION_KINDS:
            raise ValueError(f"rotate: kind must be one of {ROTATION_KINDS}, got {self.kind!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"rotate: seed must be an int >= 0, got {self.seed!r}")
        for f in ("heads", "verify"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"rotate: {f} must be a bool, got {getattr(self, f)!r}")


@lru_cache(maxsize=4)
def _rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """The same R for the prologue, every block and the epilogue (float64; a random one is costly at n = 4096+)."""
    try:
        return rotation_matrix(n, kind, seed)
    except ValueError as e:
        raise ValueError(f"rotate: hidden size {n}: {e}") from None


def _head_rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    try:
        return rotation_matrix(n, kind, seed)
    except ValueError as e:
        raise ValueError(f"rotate: head_dim {n}: {e} (or heads=False)") from None


@torch.no_grad()
def _right(t: torch.Tensor, R: torch.Tensor) -> None:
    """t <- t R in float64 (rows of t live in the rotated space)."""
    t.data = (t.data.double() @ R.to(t.device)).to(t.dtype)


@torch.no_grad()
def _left_t(t: torch.Tensor, R: torch.Tensor) -> None:
    """t <- R^T t in float64 (a weight's output rows, or a bias, written into the rotated space)."""
    t.data = (R.to(t.device).T @ t.data.double()).to(t.dtype)


def _check_norms(block) -> list:
    """The norms reading the residual stream; each must be an RMS norm with unit gain to commute with R."""
    readers = [g for g in block.norms if g.norm in block.residual.readers]
    for g in readers:
        if g.kind == "layer":
            raise ValueError(f"rotate: block {block.prefix} uses LayerNorm ({g.norm}): its mean subtraction does not "
                             f"commute with a rotation; not supported yet")
        if g.weight is not None:
            gain = block.param(g.weight).data.double() + g.offset
            dev = float((gain - 1).abs().max())
            if dev > 1e-6:
                raise ValueError(f"rotate: block {block.prefix}: norm {g.norm} has a gain != 1 (max |gain - 1| = "
                                 f"{dev:.3g}); run fuse_norms before rotate")
    return readers


@torch.no_grad()
def rotate_heads(block, a, Q: torch.Tensor) -> None:
    """Per head: v rows -> Q^T v (each kv head), o columns -> W_o[:, head] Q (every query head; GQA shares Q)."""
    v, o = block.linear_module(a.v), block.linear_module(a.o)
    hd, Q = a.head_dim, Q.to(v.weight.device)
    wv = v.weight.data.double().view(a.num_kv_heads, hd, -1)
    v.weight.data = (Q.T @ wv).reshape(v.weight.shape).to(v.weight.dtype)
    if v.bias is not None:
        bv = v.bias.data.double().view(a.num_kv_heads, hd, 1)
        v.bias.data = (Q.T @ bv).reshape(-1).to(v.bias.dtype)
    wo = o.weight.data.double().view(o.weight.shape[0], a.num_heads, hd)
    o.weight.data = (wo @ Q).reshape(o.weight.shape).to(o.weight.dtype)


@register
class Rotate(Pass):
    Config = RotateConfig
    preserves_function = True   # checked by the pass manager (verify, or --debug)
    requires = ("norms_fused",)   # a norm gain does not commute with the rotation: fold it first
    ensures = ("rotated",)
    forbids = ("clipped", "quantized")

    @torch.no_grad()
    def model_prologue(self, lm, config, ctx) -> PassResult:
        """Embeddings E -> E R (the stream starts rotated). Checks early that the final norm can commute with R."""
        emb = lm.model.get_input_embeddings()
        hidden = emb.weight.shape[1]
        R = _rotation(hidden, config.kind, config.seed)   # fails here, before any work, for an impossible size
        trace = trace_outside_blocks(lm)
        found = find_final_norm(lm, trace)
        if found is not None and not commutes_with(found[1], R, unit_gain=True):
            raise ValueError(f"rotate: the final norm {found[0]} ({type(found[1]).__name__}) does not commute with a "
                             f"rotation even at unit gain (LayerNorm's mean subtraction?); not supported yet")
        untie_head(lm)   # a head sharing the embeddings' Parameter must not rotate with them
        _right(emb.weight, R)
        err = None
        if config.verify:
            # the first block must see exactly the rotated stream: nothing else (position embeddings, a projection)
            # may write into it before the first block
            h0 = trace.block_input()
            h1 = trace_outside_blocks(lm).block_input()
            err = check_preserved((h0.double() @ R.to(h0.device)).to(h0.dtype), h1, "rotate",
                                  "the first block's input (embeddings, then anything else before the first block)")
        return PassResult(True, f"rotated the embeddings ({config.kind}, {hidden})", {"input_rel_err": err})

    def preservation_reference(self, block, config, ctx):
        """The old block on un-rotated inputs, rotated: what the rotated block must compute (its inputs arrive
        rotated by the blocks before it)."""
        if block.residual is None or not block.residual.writers:
            return None   # run() refuses this block with a clear line
        writer = block.linear_module(block.residual.writers[0])
        R = _rotation(writer.out_features, config.kind, config.seed).to(writer.weight.device)
        x = ctx.args[0]
        x_old = (x.double() @ R.to(x.device).T).to(x.dtype)
        return (call_block(block, ctx, x_old).double() @ R.to(x.device)).to(x.dtype)

    def run(self, block, config, ctx) -> PassResult:
        res = block.residual
        if res is None or not res.writers:
            raise ValueError(f"rotate: block {block.prefix}: no linear writes into the residual stream directly "
                             f"(a norm after the attention and MLP outputs, as Gemma 2 and 3 have, scales them by a "
                             f"gain that does not commute with a rotation of the stream); use a pipeline without "
                             f"rotate")
        readers = _check_norms(block)
        hidden = block.linears[res.writers[0]].out_features
        R = _rotation(hidden, config.kind, config.seed).to(block.linear_module(res.writers[0]).weight.device)
        inputs = [name for g in readers for name in g.linears]
        with torch.no_grad():
            for name in inputs:
                _right(block.linear_module(name).weight, R)
            for name in res.writers:
                mod = block.linear_module(name)
                _left_t(mod.weight, R)
                if mod.bias is not None:
                    _left_t(mod.bias, R)
        heads = []
        if config.heads:
            for a in block.attentions:
                rotate_heads(block, a, _head_rotation(a.head_dim, config.kind, config.seed))
                heads.append(f"{a.v}->{a.o}")
        details = {"inputs": inputs, "outputs": list(res.writers), "heads": heads}
        return PassResult(True, f"rotated {len(inputs)} readers, {len(res.writers)} writers, {len(heads)} v->o",
                          details, facts=self.ensures)

    @torch.no_grad()
    def model_epilogue(self, lm, config, ctx) -> PassResult:
        """Head W -> W R. Runs after fuse_norms' epilogue (pipeline order), which left the final norm at unit gain."""
        head = lm.model.get_output_embeddings()
        if head is None:
            raise ValueError("rotate: the model has no output head to take the stream out of the rotated basis")
        R = _rotation(head.weight.shape[1], config.kind, config.seed)
        found = find_final_norm(lm)
        if found is not None and not commutes_with(found[1], R):
            raise ValueError(f"rotate: the final norm {found[0]} does not commute with the rotation (gain != 1?): "
                             f"list fuse_norms before rotate so that its epilogue folds the final norm into the head")
        head = untie_head(lm)
        _right(head.weight, R)
        return PassResult(True, "rotated the head")
