"""Running a block's graph on the calibration batch a few sequences at a time, so that the intermediates of one run
(an 8B block's MLP on 128 x 2048 tokens is 15 GB per tensor in float32) are those of one chunk, while what the
passes see is unchanged: the outputs and the watched values of the chunks are written into tensors of the whole
batch, in batch order.

The chunk size depends only on the batch's shape (never on free memory), so the same inputs give the same runs and
the same artifact bytes; a batch of at most CHUNK_TOKENS tokens runs whole, as before. Sequences are independent in
a block (attention is per sequence; quantization is per token), so chunking changes no value's meaning, only which
rows a matrix product computes together (on some BLAS and GPU kernels the last bit can depend on that)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.utils._pytree as pytree

from .spill import host_empty

CHUNK_TOKENS = 16384   # tokens per run: a float32 MLP intermediate of width 14336 is 0.9 GB at this size


def chunk_sizes(batch: int, seq_len: int, max_tokens: int | None = None) -> list[int]:
    """Sequences per run: the whole batch if it fits in max_tokens (default CHUNK_TOKENS), else equal chunks of the
    largest divisor of the batch that fits (one graph shape), or, where no divisor of at least half the fitting size
    exists, full chunks and a rest."""
    fit = max(1, (max_tokens or CHUNK_TOKENS) // max(1, seq_len))
    if batch <= fit:
        return [batch]
    best = max(d for d in range(1, fit + 1) if batch % d == 0)
    if 2 * best >= fit:
        return [best] * (batch // best)
    return [fit] * (batch // fit) + ([batch % fit] if batch % fit else [])


def slice_batch(args: tuple, kwargs: dict, batch: int, i0: int, i1: int) -> tuple[tuple, dict]:
    """Every tensor whose first dimension is the batch cut to rows i0:i1; tensors the batch shares stay whole."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[i0:i1]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class _Gather:
    """Tensors of the whole batch filled chunk by chunk: a chunk's value of first dimension r * c (c sequences) goes
    to rows r * i0 : r * i1 of a tensor allocated on the first chunk (batch-major values: hidden states [b, s, h],
    heads [b, h, s, d], and their [b * s, h] flattenings alike). A value whose first dimension is not a multiple of
    the chunk's sequences (shared by the batch) is the first chunk's."""

    def __init__(self, batch: int, host: bool = False):
        self.batch, self.host = batch, host   # host: the whole batch's tensor in host memory (compiler/spill.py)
        self.out: torch.Tensor | None = None
        self.rows = 0
        self.shared = False

    def add(self, v: torch.Tensor, i0: int, i1: int) -> None:
        c = i1 - i0
        if self.out is None and not self.shared:
            if v.dim() == 0 or v.shape[0] % c:
                self.out, self.shared = v, True
                return
            self.rows = v.shape[0] // c
            shape = (self.rows * self.batch, *v.shape[1:])
            self.out = (host_empty(shape, v.dtype) if self.host
                        else torch.empty(shape, dtype=v.dtype, device=v.device))
        if self.shared:
            return
        self.out[self.rows * i0:self.rows * i1].copy_(v)


def run_chunked(run: Callable, args: tuple, kwargs: dict, batch: int, sizes: list[int],
                watch: dict[str, Callable] | None = None):
    """run(args, kwargs, watch) on each chunk; returns the output as one run on the whole batch would, and calls each
    watch callback once with the whole batch's value. One chunk: run as it is."""
    if len(sizes) == 1:
        return run(args, kwargs, watch)
    gathers: dict[str, _Gather] = {}
    outs: list[_Gather] | None = None
    spec = None
    i0 = 0
    for c in sizes:
        a, k = slice_batch(args, kwargs, batch, i0, i0 + c)

        def sink(name, i0=i0, c=c):
            # a callback with host_prep (a spilled input, context.py) has each chunk's value shaped on the device
            # and gathered in host memory: the whole batch's value never exists on the device
            prep = getattr(watch[name], "host_prep", None)

            def fn(v):
                v = v.detach() if prep is None else prep(v.detach())
                gathers.setdefault(name, _Gather(batch, host=prep is not None)).add(v, i0, i0 + c)
            return fn

        out = run(a, k, None if watch is None else {name: sink(name) for name in watch})
        leaves, spec = pytree.tree_flatten(out)
        if outs is None:   # tensors gathered; anything else (None, a constant) is the first chunk's
            outs = [_Gather(batch) if isinstance(t, torch.Tensor) else None for t in leaves]
            other = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        for g, t in zip(outs, leaves):
            if g is not None:
                g.add(t, i0, i0 + c)
        del out, leaves
        i0 += c
    if watch is not None:
        for name, fn in watch.items():
            if name in gathers:
                fn(gathers[name].out)
    return pytree.tree_unflatten([g.out if g is not None else v for g, v in zip(outs, other)], spec)
