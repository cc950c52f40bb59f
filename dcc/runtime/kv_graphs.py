"""A KV cache for `dcc generate` that stays inside the captured graphs: each block is captured once more, wrapped so
that its attention's cache is the past K/V given as graph inputs, and the keys and values it attends to (past and new,
before dcc::quant_kv) are graph outputs. transformers' DynamicCache cannot be a block input (torch.export refuses
it), so the attention gets a stand-in built inside the traced forward (_PastKV: update() is two torch.cat calls).

The past is padded to a multiple of `bucket` slots and masked (one capture per bucket, not per length); the cache
holds K/V unquantized and each step quantizes them per token and head, as the whole-sequence graph does, so a
cached step computes what the reference computes on the whole sequence (up to float summation order)."""
from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from ..ir.capture import Captures
from ..ir.ops import quant_kv
from ..models.loader import find_blocks
from .graph_blocks import GraphForward

_DROP = ("attention_mask", "cache", "past_key_values", "past_key_value", "use_cache")


class _PastKV:
    """What the block's attention sees as its cache: update() appends the step's K/V to the past ones."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, k, v, *args, **kwargs):
        self.k, self.v = torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)
        return self.k, self.v


class CachedBlock(nn.Module):
    """block(hidden, mask, past K, past V, kwargs) -> (hidden, K, V): the block's own forward with its attention
    reading the past from inputs; K and V [B, kv_heads, past + new, head_dim]."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        params = inspect.signature(type(block).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, hidden, mask, past_k, past_v, kwargs):
        cache = _PastKV(past_k, past_v)
        # the class's forward: the block's instance forward is its whole-sequence graph
        out = type(self.block).forward(self.block, hidden, attention_mask=mask, **{self.cache_arg: cache}, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), cache.k, cache.v


class _CachedForward(GraphForward):
    """GraphForward of a CachedBlock: the K/V it returns are the values before dcc::quant_kv (the cache keeps them
    unquantized; the next step quantizes them again, per token, as the reference does)."""

    def _capture(self, args, kwargs):
        gm = super()._capture(args, kwargs)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = tuple(torch.fx.node.map_arg(out.args, lambda n: n.args[0] if n.target is quant_kv else n))
        gm.recompile()
        return gm


_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its CachedBlocks (and their graphs)


def _wrappers(model) -> list[CachedBlock]:
    """The model's blocks wrapped for cached steps, made once per model so that later runs reuse the captures."""
    if model not in _WRAPPERS:
        captures, out = Captures(), []
        for block in find_blocks(model)[1]:
            fwd = block.__dict__.get("forward")
            if not isinstance(fwd, GraphForward) or fwd.splits:
                raise ValueError(f"{type(block).__name__}: not a block run as its graph")
            w = CachedBlock(block)
            w.forward = _CachedForward(w, {f"block.{p}": b for p, b in fwd.kv.items()}, captures)
            out.append(w)
        _WRAPPERS[model] = out
    return _WRAPPERS[model]


class CachedSteps:
    """The next-token logits of a model whose blocks run as graphs, with a KV cache: prefill(ids) runs the prompt
    (right-padded to its bucket, causal mask) and fills the cache; step(tokens) runs one token per row."""

    def __init__(self, model, bucket: int):
        self.model, self.bucket = model, bucket
        self.device = next(model.parameters()).device
        self.blocks, self.wrappers = list(find_blocks(model)[1]), _wrappers(model)
        cfg = model.config
        heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.n = 0   # tokens in the cache

    def _run(self, ids, position_ids, mask, past, keep):
        """The model's forward with each block routed through its cached graph; returns (logits, new K/V)."""
        news = []

        def routed(i):
            def forward(hidden, *args, **kwargs):
                if args:   # a mask or cache passed by position would be dropped unseen
                    raise ValueError(f"{type(self.blocks[i]).__name__} is called with positional arguments")
                kw = {k: v for k, v in kwargs.items() if k not in _DROP}
                out, k, v = self.wrappers[i](hidden, mask, past[i][0], past[i][1], kw)
                news.append((k[:, :, past[i][0].shape[2]:], v[:, :, past[i][1].shape[2]:]))
                return out
            return forward

        saved = [b.__dict__["forward"] for b in self.blocks]
        try:
            for i, b in enumerate(self.blocks):
                b.forward = routed(i)
            out = self.model(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep)
        finally:
            for b, f in zip(self.blocks, saved):
                b.forward = f
        return out.logits[:, -1], news

    def _zeros(self, batch, slots, dtype):
        return torch.zeros(batch, self.kv_heads, slots, self.head_dim, dtype=dtype, device=self.device)

    def prefill(self, ids: torch.Tensor, padded: int) -> torch.Tensor:
        b, n = ids.shape
        x = torch.cat([ids, ids[:, -1:].expand(-1, padded - n)], dim=1) if padded > n else ids
        dtype = self.model.get_input_embeddings().weight.dtype
        empty = [(self._zeros(b, 0, dtype), self._zeros(b, 0, dtype))] * len(self.blocks)
        mask = torch.ones(padded, padded, dtype=torch.bool, device=self.device).tril()[None, None]
        pos = torch.arange(padded, device=self.device)[None].expand(b, -1)
        logits, news = self._run(x, pos, mask, empty, torch.tensor([n - 1], device=self.device))
        slots = -(-(n + 1) // self.bucket) * self.bucket
        self.k, self.v = [], []
        for k, v in news:
            ck, cv = self._zeros(b, slots, k.dtype), self._zeros(b, slots, v.dtype)
            ck[:, :, :n], cv[:, :, :n] = k[:, :, :n], v[:, :, :n]
            self.k.append(ck)
            self.v.append(cv)
        self.n = n
        return logits.float().cpu()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] at position self.n: their logits [B, V] (float32, CPU); the cache gains their K/V."""
        b, slots = tokens.shape[0], self.k[0].shape[2]
        if self.n >= slots:   # full: one more bucket of slots (and one more capture)
            self.k = [torch.cat([k, self._zeros(b, self.bucket, k.dtype)], dim=2) for k in self.k]
            self.v = [torch.cat([v, self._zeros(b, self.bucket, v.dtype)], dim=2) for v in self.v]
            slots += self.bucket
        # attend to the n cached slots and to the token itself (the last key); the empty slots are masked out
        mask = torch.zeros(1, 1, 1, slots + 1, dtype=torch.bool, device=self.device)
        mask[..., :self.n] = True
        mask[..., -1] = True
        pos = torch.full((b, 1), self.n, dtype=torch.long, device=self.device)
        logits, news = self._run(tokens.to(self.device)[:, None], pos, mask, list(zip(self.k, self.v)), 1)
        for i, (k, v) in enumerate(news):
            self.k[i][:, :, self.n], self.v[i][:, :, self.n] = k[:, :, 0], v[:, :, 0]
        self.n += 1
        return logits.float().cpu()
