"""Data-parallel calibration's world (dcc/compiler/dist.py): the recursive halving of the calibration sequences, and
reductions that give the same bits for 1, 2 and 4 gloo ranks on the CPU -- float32 Gram matrices summed by the
canonical 8-leaf tree (B = 5 has empty leaves, B = 11 uneven ones), max, cat_rows of unequal row counts, broadcasts.
The ranks are this file run as a script (see the bottom), started by dcc's own launcher."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dcc.compiler import dist
from dcc.compiler.dist import LEAVES, SINGLE, World, halves, leaves, nodes

BATCHES = (5, 11, 16)
TOKENS, HIDDEN = 7, 24
ROWS = (3, 0, 2, 5)   # cat_rows: rank r contributes ROWS[r] rows (rank 1 none)


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks compute their leaf partials with one thread; so does the single-process reference, so that only
    the order of the additions could make them differ."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(n_seq: int) -> torch.Tensor:
    """Calibration activations whose sequences differ in scale by orders of magnitude, so that a different order
    of the float32 additions shows in the last bits."""
    g = torch.Generator().manual_seed(n_seq)
    scale = torch.exp(3 * torch.randn(n_seq, 1, 1, generator=g))
    return torch.randn(n_seq, TOKENS, HIDDEN, generator=g) * scale


def gram_partials(x: torch.Tensor, leaf_list: list[tuple[int, int]]) -> list[torch.Tensor]:
    """X_leaf^T X_leaf of each leaf's rows alone; zeros for an empty leaf."""
    parts = []
    for start, count in leaf_list:
        rows = x[start:start + count].reshape(-1, HIDDEN)
        parts.append(rows.T @ rows if count else torch.zeros(HIDDEN, HIDDEN))
    return parts


def rank_tensor(rank: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + rank))


def rank_rows(rank: int) -> torch.Tensor:
    return torch.arange(ROWS[rank] * 3, dtype=torch.float64).reshape(ROWS[rank], 3) + 1000 * rank


# -- recursive halving ----------------------------------------------------------------------------------------------

def test_halves_gives_the_odd_sequence_to_the_first_child():
    assert halves(0, 5) == ((0, 3), (3, 2))
    assert halves(7, 4) == ((7, 2), (9, 2))
    assert halves(3, 0) == ((3, 0), (3, 0))
    assert leaves(5) == [(0, 1), (1, 1), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0)]
    assert leaves(11) == [(0, 2), (2, 1), (3, 2), (5, 1), (6, 2), (8, 1), (9, 1), (10, 1)]


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_nodes_cover_the_sequences_in_order(depth):
    for n in range(41):
        level = nodes(n, depth)
        assert len(level) == 2 ** depth
        assert [s for s, _ in level] == [sum(c for _, c in level[:i]) for i in range(len(level))]
        assert sum(c for _, c in level) == n
        assert max(c for _, c in level) - min(c for _, c in level) <= 1


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_a_ranks_leaves_are_the_children_of_its_share(size):
    for n in range(41):
        for rank in range(size):
            world = World(rank, size, torch.device("cpu"), None if size == 1 else "gloo")
            assert world.shares(n) == nodes(n, size.bit_length() - 1)
            assert world.share(n) == world.shares(n)[rank]
            below = [world.share(n)]
            while len(below) < LEAVES // size:
                below = [child for node in below for child in halves(*node)]
            assert world.my_leaves(n) == below


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        World(0, 3, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        World(2, 2, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="needs a backend"):
        World(0, 2, torch.device("cpu"), None)
    with pytest.raises(ValueError, match=r"^tree_sum: rank 1 passed 3 partials, expected 4$"):
        World(1, 2, torch.device("cpu"), "gloo").tree_sum([torch.zeros(2)] * 3)
    with pytest.raises(ValueError, match=r"^tree_sum: rank 0 passed 4 partials, expected 8$"):
        SINGLE.tree_sum([torch.zeros(2)] * 4)
    with pytest.raises(ValueError, match="partial 5 is torch.float32 \\(3,\\)"):
        SINGLE.tree_sum([torch.zeros(2)] * 5 + [torch.zeros(3)] * 3)
    with pytest.raises(RuntimeError, match="no process group"):
        World(0, 2, torch.device("cpu"), "gloo").max(torch.zeros(2))


# -- a single process -----------------------------------------------------------------------------------------------

def test_tree_sum_adds_the_leaves_by_the_fixed_pairwise_tree():
    # float32 values whose sum depends on the order: 1 + 1e8 rounds to 1e8 (the spacing there is 8)
    parts = [torch.tensor([v]) for v in (1.0, 1e8, -1e8, 1.0, 3.0, 0.5, 7.0, -3.0)]
    p = parts
    tree = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
    left_to_right = p[0]
    for x in p[1:]:
        left_to_right = left_to_right + x
    assert not torch.equal(tree, left_to_right)   # the data tells the orders apart
    assert torch.equal(SINGLE.tree_sum(parts), tree)
    assert [x.item() for x in parts] == [1.0, 1e8, -1e8, 1.0, 3.0, 0.5, 7.0, -3.0]   # inputs untouched


def test_a_single_world_needs_no_process_group():
    assert not torch.distributed.is_initialized()
    assert SINGLE.main and not SINGLE.distributed and dist.current() == SINGLE
    t = rank_tensor(0)
    assert torch.equal(SINGLE.max(t), t) and SINGLE.max(t) is not t
    assert torch.equal(SINGLE.cat_rows(rank_rows(0)), rank_rows(0))
    assert SINGLE.broadcast_object({"a": 1}) == {"a": 1}
    assert SINGLE.broadcast(t) is t
    assert SINGLE.all_true(True) and not SINGLE.all_true(False)
    SINGLE.barrier()
    with pytest.raises(ValueError, match="source rank 1 is outside a world of 1"):
        SINGLE.broadcast_object(1, src=1)


def test_init_from_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DCC_DIST_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    try:
        world = dist.init_from_env("cpu")
        assert (world.rank, world.size, world.backend) == (0, 1, None) and dist.current() is world
        for size in ("3", "16"):
            monkeypatch.setenv("WORLD_SIZE", size)
            with pytest.raises(ValueError, match=f"WORLD_SIZE={size}: .*1, 2, 4 or 8 processes"):
                dist.init_from_env("cpu")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="RANK is not set"):
            dist.init_from_env("cpu")
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
            dist.init_from_env("cpu")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        monkeypatch.setenv("DCC_DIST_TIMEOUT_S", "soon")
        with pytest.raises(ValueError, match="DCC_DIST_TIMEOUT_S must be a number of seconds > 0, got 'soon'"):
            dist.init_from_env("cpu")
        assert not torch.distributed.is_initialized()
    finally:
        dist.set_current(SINGLE)


# -- 2 and 4 gloo ranks ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, tmp_path_factory):
    """What each rank of a world of `size` computed (see worker below)."""
    from dcc.compiler.launch import launch
    size = request.param
    out = tmp_path_factory.mktemp(f"dist{size}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCC_DIST_TIMEOUT_S", "60")   # a bug that leaves a rank waiting fails the test in a minute
        rc = launch([str(out)], size, "cpu", command=[sys.executable, __file__])
    assert rc == 0
    return [torch.load(out / f"rank{r}.pt") for r in range(size)]


def test_tree_sum_equals_a_single_process_bit_for_bit(ranks):
    for b in BATCHES:
        expected = SINGLE.tree_sum(gram_partials(batch(b), SINGLE.my_leaves(b)))
        for res in ranks:
            k = LEAVES // len(ranks)
            assert res["leaves"][b] == leaves(b)[res["rank"] * k:(res["rank"] + 1) * k]
            assert res["gram"][b].dtype == torch.float32
            assert torch.equal(res["gram"][b], expected), (b, res["rank"])


def test_max_cat_rows_and_broadcasts(ranks):
    size = len(ranks)
    for res in ranks:
        assert (res["size"], res["backend"], res["current"]) == (size, "gloo", True)
        assert torch.equal(res["max"], torch.stack([rank_tensor(r) for r in range(size)]).amax(0))
        assert torch.equal(res["rows"], torch.cat([rank_rows(r) for r in range(size)]))
        assert res["object"] == {"block": "model.layers.0", "from": 0}
        assert torch.equal(res["broadcast"], torch.full((3,), float(size - 1)))
        assert res["all_true"] == (True, False)
        # every rank, not only the odd one, refuses a tensor of another width
        assert res["mismatch"] == ("cat_rows: rank 1's tensor (torch.float32 (2, 4)) does not match rank 0's "
                                   "(torch.float32 (2, 3)) beyond dim 0")


def worker(out: Path) -> None:
    """One rank: each collective on this rank's share; the results go to out/rank<R>.pt."""
    torch.set_num_threads(1)
    world = dist.init_from_env("cpu")
    try:
        res = {"rank": world.rank, "size": world.size, "backend": world.backend, "current": dist.current() is world,
               "leaves": {}, "gram": {}}
        for b in BATCHES:
            res["leaves"][b] = world.my_leaves(b)
            res["gram"][b] = world.tree_sum(gram_partials(batch(b), world.my_leaves(b)))
        res["max"] = world.max(rank_tensor(world.rank))
        res["rows"] = world.cat_rows(rank_rows(world.rank))
        res["object"] = world.broadcast_object({"block": "model.layers.0", "from": world.rank} if world.main else None)
        res["broadcast"] = world.broadcast(torch.full((3,), float(world.rank)), src=world.size - 1)
        res["all_true"] = (world.all_true(True), world.all_true(world.rank != world.size - 1))
        try:
            world.cat_rows(torch.zeros(2, 4 if world.rank == 1 else 3))
        except ValueError as e:
            res["mismatch"] = str(e)
        world.barrier()
        torch.save(res, out / f"rank{world.rank}.pt")
    finally:
        dist.shutdown()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_pairwise_sum_as_terms_come_has_the_bits_of_the_level_by_level_sum(n):
    """stats.tree feeds the leaves' partials one at a time (at most log2(n) + 1 alive): the same additions in the
    same order as summing neighbours level by level over the whole list, so the same bits (float32 sums of mixed
    magnitudes differ by order)."""
    g = torch.Generator().manual_seed(n)
    ts = [torch.randn(64, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,), generator=g)) for _ in range(n)]
    acc = dist.PairwiseSum()
    for t in ts:
        acc.add(t)
    levels = list(ts)
    while len(levels) > 1:   # the level-by-level tree: [a, b, c, d] -> (a + b) + (c + d)
        levels = [levels[i] + levels[i + 1] for i in range(0, len(levels), 2)]
    assert torch.equal(acc.total(), levels[0])


def test_pairwise_sum_refuses_a_count_that_is_not_a_power_of_two():
    acc = dist.PairwiseSum()
    for _ in range(3):
        acc.add(torch.ones(2))
    with pytest.raises(ValueError, match="power of two"):
        acc.total()
