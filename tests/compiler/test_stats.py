"""InputStats (dcc/compiler/stats.py) in one process: the reductions passes read equal what they read of the whole
batch before the batch could be split -- maxima and selected rows exactly, sums by the canonical 8-leaf tree (equal
to a plain sum up to rounding); inputs that are not whole rows per sequence fall back to rows as units."""
import pytest
import torch

from dcc.compiler import dist
from dcc.compiler.stats import InputStats


def batch(seqs=11, per=5, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seqs * per, k, generator=g)


def test_maxima_and_rows_are_exact():
    x = batch()
    s = InputStats(dist.SINGLE, 11, 11)
    assert torch.equal(s.absmax(x), x.abs().amax(0))
    idx = torch.tensor([0, 3, 17, 54])
    assert torch.equal(s.rows(x, idx), x[idx]) and torch.equal(s.rows(x), x)
    assert s.tokens(x) == 55 and torch.equal(s.head(x, 7), x[:7]) and s.head(x, 100).shape[0] == 55


def test_sums_follow_the_leaves_and_the_tree():
    x = batch(seqs=11, per=5)
    s = InputStats(dist.SINGLE, 11, 11)
    got = s.tree(x, lambda v: v.T @ v)
    # the same leaves of 11 sequences (5 rows each), added pairwise
    parts = [x[a * 5:(a + c) * 5].T @ x[a * 5:(a + c) * 5] for a, c in dist.leaves(11)]
    want = ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))
    assert torch.equal(got, want)
    assert torch.allclose(got, x.T @ x, rtol=1e-5, atol=1e-5)


def test_fewer_sequences_than_leaves_give_empty_leaves():
    x = batch(seqs=3, per=4)
    s = InputStats(dist.SINGLE, 3, 3)
    assert torch.allclose(s.tree(x, lambda v: v.abs().sum(0, dtype=torch.float64)), x.abs().double().sum(0))


def test_rows_that_are_not_whole_sequences_are_their_own_units():
    x = batch(seqs=4, per=5)[:17]   # a truncated collection
    s = InputStats(dist.SINGLE, 4, 4)
    assert s.tokens(x) == 17
    assert torch.allclose(s.tree(x, lambda v: v.sum(0)), x.sum(0), atol=1e-5)


def test_a_share_that_does_not_match_the_world_is_refused():
    with pytest.raises(ValueError, match="holds 3 sequences"):
        InputStats(dist.SINGLE, 11, 3)
