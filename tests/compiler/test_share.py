"""compiler/share.py: the work split of a distributed compile (which rank computes which job; a rank's QuantizedTensor
and small values on every rank, exactly), on a single world and on 2 and 4 gloo ranks started by the launcher."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dcc.compiler import dist
from dcc.compiler.dist import SINGLE
from dcc.compiler.share import evaluate_split, gather_values, owners, share_qtensor
from dcc.ir.formats import QuantSpec, quantize_tensor

SPEC = QuantSpec("int4", group_size=32)


def test_owners_put_the_largest_jobs_first_on_the_least_loaded_rank():
    assert owners([5.0, 1.0, 1.0], 2) == [0, 1, 1]
    assert owners([1.0, 3.0, 2.0, 2.0], 2) == [0, 0, 1, 1]       # 3 -> 0, 2 -> 1, 2 -> 1 (2 < 3), 1 -> 0 (3 < 4)
    assert owners([2.0, 2.0, 2.0], 4) == [0, 1, 2]               # ties: lower job index, lower rank
    assert owners([7.0, 3.0], 1) == [0, 0]
    assert owners([], 3) == []


def test_a_single_world_shares_without_copying():
    qt = quantize_tensor(torch.randn(8, 64), SPEC)
    assert share_qtensor(SINGLE, qt, 0, SPEC) is qt
    assert gather_values(SINGLE, {3: 1.5}) == {3: 1.5}
    seen = []
    assert evaluate_split(SINGLE, 4, lambda i: seen.append(i) or i * i) == [0, 1, 4, 9] and seen == [0, 1, 2, 3]
    assert evaluate_split(None, 2, float) == [0.0, 1.0]


def weight(seed: int) -> torch.Tensor:
    return torch.randn(24, 96, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request, tmp_path_factory):
    from dcc.compiler.launch import launch
    size = request.param
    out = tmp_path_factory.mktemp(f"share{size}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCC_DIST_TIMEOUT_S", "60")
        rc = launch([str(out)], size, "cpu", command=[sys.executable, __file__])
    assert rc == 0
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(size)]


def test_every_rank_gets_each_owners_result_exactly(ranks):
    size = len(ranks)
    for res in ranks:
        assert res["values"] == {j: float(j) / 7 for j in range(2 * size)}
        assert res["split"] == [i / 3 for i in range(5)]
        # each index evaluated on one rank only: rank r took r, r + size, ...
        assert res["evaluated"] == list(range(res["rank"], 5, size))
        for src in range(size):
            want = quantize_tensor(weight(src), SPEC)
            got = res["qt"][src]
            assert got["codes"].dtype == want.codes.dtype and torch.equal(got["codes"], want.codes)
            assert torch.equal(got["scale"], want.scale) and torch.equal(got["zero"], want.zero)
            assert got["scale0"] is None


def worker(out: Path) -> None:
    """One rank: rank r quantizes weight(r) and every rank receives each; values j = rank (mod size) from each."""
    torch.set_num_threads(1)
    world = dist.init_from_env("cpu")
    try:
        res = {"qt": {}}
        mine = {j: float(j) / 7 for j in range(2 * world.size) if j % world.size == world.rank}
        res["values"] = gather_values(world, mine)
        res["rank"], evaluated = world.rank, []
        res["split"] = evaluate_split(world, 5, lambda i: evaluated.append(i) or i / 3)
        res["evaluated"] = evaluated
        for src in range(world.size):
            qt = quantize_tensor(weight(src), SPEC) if src == world.rank else None
            got = share_qtensor(world, qt, src, SPEC)
            res["qt"][src] = {"codes": got.codes, "scale": got.scale, "zero": got.zero, "scale0": got.scale0}
        torch.save(res, out / f"rank{world.rank}.pt")
    finally:
        dist.shutdown()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
