"""Data-parallel calibration (issue 31): the world of ranks that share the calibration sequences, and reductions
whose result does not depend on how many ranks there are.

Floating-point addition is not associative, so a Gram matrix summed over 1 rank and over 2 ranks differs in its
last bits unless both add the same partial sums in the same order. The batch of B sequences is therefore cut the
same way whatever the world size: by recursive halving (a node (start, n) has the children (start, ceil(n/2)) and
(start + ceil(n/2), floor(n/2))) down to depth 3, the LEAVES = 8 canonical leaves (empty ones when B < 8). A sum is
computed per leaf from that leaf's rows alone and the 8 partials are added by one fixed pairwise tree,
((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). With W ranks (1, 2, 4 or 8) rank r owns node r at depth log2(W), a whole
subtree of 8/W leaves: it adds those locally by the same tree, the W subtree sums are all-gathered, and every rank
adds them by the top of the tree. Each addition is elementwise IEEE add of the same two operands, so every rank and
every W gets the same bits. Empty leaves contribute zeros (x + 0 == x exactly).

A single process (size 1) needs no torch.distributed: every method then computes locally, tree_sum still by the
same 8-leaf tree. init_from_env starts the process group from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), gloo on the CPU and NCCL on GPUs; current() is the world the compiler reads."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

LEAVES = 8
DEPTH = 3   # LEAVES == 2 ** DEPTH
DEFAULT_TIMEOUT_S = 30 * 60.0


def halves(start: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two children of node (start, n): the first gets the odd sequence, ceil(n/2), the second floor(n/2)."""
    if start < 0 or n < 0:
        raise ValueError(f"halves: a node needs a start and a count >= 0, got ({start}, {n})")
    n0 = (n + 1) // 2
    return (start, n0), (start + n0, n - n0)


def nodes(n_seq: int, depth: int) -> list[tuple[int, int]]:
    """The 2**depth nodes at `depth` of the halving tree of n_seq sequences, as (start, count), in order."""
    if n_seq < 0 or depth < 0:
        raise ValueError(f"nodes: need n_seq >= 0 and depth >= 0, got n_seq={n_seq}, depth={depth}")
    level = [(0, n_seq)]
    for _ in range(depth):
        level = [child for node in level for child in halves(*node)]
    return level


def leaves(n_seq: int) -> list[tuple[int, int]]:
    """The LEAVES canonical leaves of n_seq sequences (some empty when n_seq < LEAVES)."""
    return nodes(n_seq, DEPTH)


def _log2(size: int) -> int:
    """log2 of a world size that is a power of two <= LEAVES, else a ValueError."""
    if size < 1 or size > LEAVES or size & (size - 1):
        raise ValueError(f"the number of ranks must be 1, 2, 4 or 8 (a power of two up to {LEAVES}), got {size}")
    return size.bit_length() - 1


class PairwiseSum:
    """The sum of a power-of-two list of tensors by adding neighbours level by level -- [a, b, c, d] -> (a + b) +
    (c + d) -- fed one tensor at a time: a partial sum is added to its neighbour as soon as both exist, so at most
    log2(n) + 1 partials are alive instead of n (8 leaves' Gram matrices of a 70B down_proj's 28672 inputs are
    26 GB). The levels of this tree over a rank's leaves, then over the ranks' subtree sums, are the levels of the
    8-leaf tree."""

    def __init__(self):
        self._stack: list[tuple[int, torch.Tensor]] = []   # (level, partial): levels strictly decreasing

    def add(self, t: torch.Tensor) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            t = self._stack.pop()[1] + t   # left neighbour + right
            level += 1
        self._stack.append((level, t))

    def total(self) -> torch.Tensor:
        if len(self._stack) != 1:
            raise ValueError(f"PairwiseSum: {len(self._stack)} partial sums left; the number of terms must be a "
                             f"power of two")
        return self._stack[0][1]


def _pairwise(ts: list[torch.Tensor]) -> torch.Tensor:
    """PairwiseSum of a whole list."""
    acc = PairwiseSum()
    for t in ts:
        acc.add(t)
    return acc.total()


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: rank, size, its device, and the torch.distributed backend (None for a
    single process). Every collective must be called by all ranks, in the same order."""
    rank: int
    size: int
    device: torch.device
    backend: str | None = None

    def __post_init__(self):
        _log2(self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.size}")
        if self.size > 1 and self.backend is None:
            raise ValueError(f"a world of {self.size} ranks needs a backend (gloo or nccl)")

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the artifact and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n_seq: int) -> tuple[int, int]:
        """This rank's sequences as (start, count): node `rank` at depth log2(size)."""
        return self.shares(n_seq)[self.rank]

    def shares(self, n_seq: int) -> list[tuple[int, int]]:
        """Every rank's (start, count), in rank order."""
        return nodes(n_seq, _log2(self.size))

    def my_leaves(self, n_seq: int) -> list[tuple[int, int]]:
        """This rank's canonical leaves (global (start, count)), in order: the descendants of its share."""
        k = LEAVES // self.size
        return leaves(n_seq)[self.rank * k:(self.rank + 1) * k]

    # -- collectives ----------------------------------------------------------------------------------------------

    def _check_group(self, what: str) -> None:
        if not torch_dist.is_available() or not torch_dist.is_initialized():
            raise RuntimeError(f"{what}: rank {self.rank} of {self.size} has no process group "
                               f"(dcc.compiler.dist.init_from_env starts it)")

    def _check_device(self, what: str, t: torch.Tensor) -> None:
        if self.distributed and t.device != self.device:
            raise ValueError(f"{what}: rank {self.rank} passed a tensor on {t.device}, expected {self.device}")

    def tree_sum(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """The canonical 8-leaf tree sum of a statistic, the same bits on every rank and for every world size.
        `partials` are this rank's leaf partials in leaf order (LEAVES // size of them, one shape and dtype; zeros
        for empty leaves). The inputs are not modified."""
        k = LEAVES // self.size
        if len(partials) != k:
            raise ValueError(f"tree_sum: rank {self.rank} passed {len(partials)} partials, expected {k}")
        first = partials[0]
        for i, p in enumerate(partials):
            if p.shape != first.shape or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"tree_sum: rank {self.rank}'s partial {i} is {p.dtype} {tuple(p.shape)} on "
                                 f"{p.device}, partial 0 is {first.dtype} {tuple(first.shape)} on {first.device}")
            self._check_device("tree_sum", p)
        return self.tree_combine(_pairwise(list(partials)))

    def tree_combine(self, local: torch.Tensor) -> torch.Tensor:
        """The canonical tree sum from this rank's subtree sum (its leaves' partials summed by PairwiseSum): the
        same bits as tree_sum of the partials."""
        self._check_device("tree_sum", local)
        if not self.distributed:
            return local   # a single process has all 8 leaves: local is already the whole tree
        self._check_group("tree_sum")
        local = local.contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        torch_dist.all_gather(gathered, local)   # exact copies: the subtree sums travel bit for bit
        return _pairwise(gathered)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks (exact: no rounding), as a new tensor."""
        out = t.clone().contiguous()
        if self.distributed:
            self._check_device("max", t)
            self._check_group("max")
            torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
        return out

    def cat_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0 in rank order; row counts may differ, other dims may not."""
        if not self.distributed:
            if t.dim() == 0:
                raise ValueError("cat_rows: rank 0 passed a 0-d tensor; it needs rows (dim 0)")
            return t.clone()
        self._check_device("cat_rows", t)
        self._check_group("cat_rows")
        # every rank's shape and dtype first, so that all ranks see the same mismatch and raise the same error
        # rather than one raising while the others wait in the gather
        metas: list[Any] = [None] * self.size
        torch_dist.all_gather_object(metas, (tuple(t.shape), str(t.dtype)))
        for r, (shape, dtype) in enumerate(metas):
            if not shape:
                raise ValueError(f"cat_rows: rank {r} passed a 0-d tensor; it needs rows (dim 0)")
            if len(shape) != len(metas[0][0]) or shape[1:] != metas[0][0][1:] or dtype != metas[0][1]:
                raise ValueError(f"cat_rows: rank {r}'s tensor ({dtype} {shape}) does not match rank 0's "
                                 f"({metas[0][1]} {metas[0][0]}) beyond dim 0")
        rows = [shape[0] for shape, _ in metas]
        most = max(rows)
        if most == 0:
            return t.new_empty((0, *t.shape[1:]))
        padded = t.new_zeros((most, *t.shape[1:]))
        padded[:t.shape[0]] = t
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        torch_dist.all_gather(gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, rows)])

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank src's picklable object on every rank."""
        self._check_src("broadcast_object", src)
        if not self.distributed:
            return obj
        self._check_group("broadcast_object")
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite t in place with rank src's t (same shape and dtype on every rank); returns t."""
        self._check_src("broadcast", src)
        if self.distributed:
            self._check_device("broadcast", t)
            self._check_group("broadcast")
            torch_dist.broadcast(t, src=src)
        return t

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            self._check_group("barrier")
            torch_dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """Whether flag is true on every rank (so that all ranks take the same branch)."""
        if not self.distributed:
            return bool(flag)
        self._check_group("all_true")
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        return bool(t.item())

    def _check_src(self, what: str, src: int) -> None:
        if not 0 <= src < self.size:
            raise ValueError(f"{what}: source rank {src} is outside a world of {self.size}")


SINGLE = World(0, 1, torch.device("cpu"), None)
_current: World = SINGLE


def current() -> World:
    """The world of this process (a single process unless init_from_env or set_current said otherwise)."""
    return _current


def set_current(world: World) -> None:
    global _current
    _current = world


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"{name} is not set; start the ranks with torchrun or dcc compile --procs/--gpus")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("DCC_DIST_TIMEOUT_S")
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"DCC_DIST_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str) -> World:
    """The world described by torchrun's variables; starts the process group (NCCL on cuda:LOCAL_RANK for a cuda
    device, gloo for the CPU) when WORLD_SIZE > 1, else a single world on `device`. Also makes it current()."""
    dev = torch.device(device)
    size = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
    if size <= 1:
        world = World(0, 1, dev, None)
        set_current(world)
        return world
    if size > LEAVES or size & (size - 1):
        raise ValueError(f"WORLD_SIZE={size}: data-parallel calibration needs 1, 2, 4 or 8 processes "
                         f"(a power of two up to {LEAVES}, so that the reduction order is the same for all)")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    if not os.environ.get("MASTER_ADDR"):
        raise ValueError("MASTER_ADDR is not set; start the ranks with torchrun or dcc compile --procs/--gpus")
    _env_int("MASTER_PORT")
    timeout = _timeout()
    if dev.type == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"rank {rank} needs cuda:{local_rank} (LOCAL_RANK={local_rank}) but this machine has "
                             f"{count} CUDA device{'s' if count != 1 else ''}")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
        torch_dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout, device_id=dev)
    elif dev.type == "cpu":
        backend = "gloo"
        torch_dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    else:
        raise ValueError(f"data-parallel calibration runs on cpu or cuda devices, not {device!r}")
    world = World(rank, size, dev, backend)
    set_current(world)
    return world


def shutdown() -> None:
    """Destroy the process group if there is one; current() is a single world again."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    set_current(SINGLE)
