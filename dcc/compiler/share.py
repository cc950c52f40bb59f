"""Work split across the processes of a distributed compile (compiler/dist.py): which process computes which of a
stage's independent results, and how a result computed on one process reaches the others unchanged. A result is the
same bits whichever process computes it (same inputs, same arithmetic), so splitting the work keeps the artifact's
bytes; only the time changes."""
from __future__ import annotations

from typing import Sequence

import torch

from ..ir.formats import QuantizedTensor


def owners(costs: Sequence[float], size: int) -> list[int]:
    """A process for each job: largest first onto the least loaded process (ties: lower job index, then lower rank),
    so every process derives the same assignment from the same costs."""
    load = [0.0] * size
    out = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[j] = r
        load[r] += costs[j]
    return out


def gather_values(world, mine: dict) -> dict:
    """Every rank's `mine` (small picklable values keyed by job) merged on every rank: one broadcast per rank."""
    if not world.distributed:
        return dict(mine)
    out = {}
    for r in range(world.size):
        out.update(world.broadcast_object(mine if world.rank == r else None, src=r))
    return out


def evaluate_split(world, n: int, evaluate) -> list:
    """[evaluate(0), ..., evaluate(n - 1)] on every rank, each computed on rank i % size (a search's candidates:
    evaluate must give the same value on any rank, and run no collective)."""
    if world is None or not world.distributed:
        return [evaluate(i) for i in range(n)]
    got = gather_values(world, {i: evaluate(i) for i in range(world.rank, n, world.size)})
    return [got[i] for i in range(n)]


_FIELDS = ("codes", "scale", "zero", "scale0")


def share_qtensor(world, qt: QuantizedTensor | None, src: int, spec) -> QuantizedTensor:
    """Rank src's QuantizedTensor on every rank: the tensors' shapes and dtypes first (a small object), then each
    tensor's bytes by a broadcast on the world's device; `spec` (the same object on every rank) is not sent."""
    if not world.distributed:
        assert qt is not None
        return qt
    meta = None
    if world.rank == src:
        meta = {f: None if getattr(qt, f) is None else (tuple(getattr(qt, f).shape), str(getattr(qt, f).dtype))
                for f in _FIELDS}
    meta = world.broadcast_object(meta, src=src)
    parts = {}
    for f in _FIELDS:
        if meta[f] is None:
            parts[f] = None
            continue
        shape, dtype = meta[f]
        if world.rank == src:
            t = getattr(qt, f).to(world.device).contiguous()
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype.replace("torch.", "")), device=world.device)
        # as bytes: the backends do not all carry every dtype (gloo has no int16), and a byte copy is exact
        world.broadcast(t.reshape(-1).view(torch.uint8), src=src)
        parts[f] = t
    if world.rank == src:   # the owner keeps its own tensors
        return qt
    return QuantizedTensor(parts["codes"], parts["scale"], parts["zero"], spec, scale0=parts["scale0"])
