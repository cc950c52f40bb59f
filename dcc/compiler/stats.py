"""What passes read of a linear's calibration inputs, computed one way whether the calibration batch is held by one
process or split over several (issue 31, compiler/dist.py).

A pass gets its local inputs x [t, K] from BlockContext.inputs (the rows of this process's share of the sequences,
batch-major: sequence by sequence) and reduces them through these functions, never by itself:
- absmax(x): the channel maxima of |x| over every token (max is exact in any order);
- tree(x, fn): a sum statistic (a Gram matrix X^T X, channel sums of |x|): fn applied to the rows of each of the
  batch's 8 canonical leaves (dist.leaves: recursive halves of the sequences), the partials summed by one fixed
  pairwise tree. The same leaves and the same tree whatever the number of processes, so the sum has the same bits
  in 1, 2, 4 or 8 processes (a single GEMM over all rows would not: its reduction order follows the row count);
- rows(x, idx): the tokens at global indices idx (sorted), gathered in index order (evenly spaced subsets, the
  first tokens);
- tokens(x): the number of tokens of the whole batch.
Decisions read off these are the same in every process, so every process holds the same weights after each pass.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import dist, spill


class InputStats:
    """Reductions over the calibration batch of `n_seq` sequences, of which this process holds its world's share."""

    def __init__(self, world: "dist.World", n_seq: int, local_seq: int, device: torch.device | str | None = None):
        self.world, self.n_seq = world, n_seq
        # where the reductions compute: inputs held elsewhere (spilled to the host, compiler/spill.py) are moved
        # here a leaf or a block of rows at a time; None: where each input is
        self.device = None if device is None else torch.device(device)
        self.start, count = world.share(n_seq)
        if count != local_seq:
            raise ValueError(f"stats: this process holds {local_seq} sequences, its share of {n_seq} is {count}")
        self.local_seq = local_seq
        self.leaves = world.my_leaves(n_seq)

    def _unit(self, x: torch.Tensor) -> tuple[int, int, list[tuple[int, int]]]:
        """(rows per unit, first unit, leaves) where units are sequences, or, for inputs that are not a whole number
        of rows per sequence (a single process only: a truncated collection), rows themselves."""
        if self.local_seq and x.shape[0] % self.local_seq == 0:
            return x.shape[0] // self.local_seq, self.start, self.leaves
        if self.world.distributed:
            raise ValueError(f"stats: {x.shape[0]} input rows are not a whole number of rows for each of this "
                             f"process's {self.local_seq} sequences")
        return 1, 0, dist.leaves(x.shape[0])

    def tokens(self, x: torch.Tensor) -> int:
        per, _, leaves = self._unit(x)
        return per * self.n_seq if leaves is self.leaves else x.shape[0]

    def absmax(self, x: torch.Tensor) -> torch.Tensor:
        """[K] max over all tokens of |x| (float32; 0 where no token)."""
        if self._away(x):
            return self.world.max(spill.absmax(x, self.device))
        local = x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1:])
        return self.world.max(local)

    def _away(self, x: torch.Tensor) -> bool:
        """x is held outside the compute device (spilled)."""
        return self.device is not None and x.device.type != self.device.type

    def _here(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device) if self._away(x) else x

    def tree(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The canonical tree sum of fn over the leaves' rows (fn of an empty leaf must give zeros of the same
        shape, as x.T @ x and x.sum(0) do)."""
        per, first, leaves = self._unit(x)
        if len(leaves) & (len(leaves) - 1):   # not a power of two: cannot be (the 8 leaves, or a rank's share)
            raise ValueError(f"stats: {len(leaves)} leaves")
        acc = dist.PairwiseSum()   # the leaves' partials summed as they come (at most 4 alive), same bits
        for s, c in leaves:
            acc.add(fn(self._here(x[(s - first) * per:(s - first + c) * per])))
        return self.world.tree_combine(acc.total())

    def rows(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """x's rows at the batch's token indices idx (ascending; None: every token), in that order."""
        if not self.world.distributed:
            return self._here(x if idx is None else x[idx.to(x.device)])
        per, first, _ = self._unit(x)
        if idx is None:
            return self.world.cat_rows(self._here(x))
        lo, hi = first * per, (first + self.local_seq) * per
        idx = idx.to(x.device)
        mine = idx[(idx >= lo) & (idx < hi)] - lo
        return self.world.cat_rows(self._here(x[mine]))

    def head(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The batch's first n tokens (fewer if it has fewer)."""
        return self.rows(x, torch.arange(min(n, self.tokens(x))))

