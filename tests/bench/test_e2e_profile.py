"""bench/_e2e_profile.critical_path: what each kernel adds to a step when kernels overlap (PDL)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
pytest.importorskip("torch")
from _e2e_profile import critical_path  # noqa: E402


def test_overlapping_kernels_are_credited_only_what_they_add():
    # a: 0-10; b starts early (PDL) and waits, ends at 14 -> adds 4; c lies inside b -> adds 0;
    # d starts after an idle gap at 20 and ends at 25 -> adds 25 - 14 = 11 (its 5 us and the 6 us gap)
    spans = [("b", 2.0, 14.0), ("a", 0.0, 10.0), ("c", 11.0, 13.0), ("d", 20.0, 25.0)]
    acc = critical_path(spans)
    assert {k: v[2] for k, v in acc.items()} == {"a": 10.0, "b": 4.0, "c": 0.0, "d": 11.0}
    assert {k: v[1] for k, v in acc.items()} == {"a": 10.0, "b": 12.0, "c": 2.0, "d": 5.0}
    assert sum(v[2] for v in acc.values()) == 25.0   # the span from the first start to the last end


def test_repeated_names_sum_their_calls():
    acc = critical_path([("k", 0.0, 1.0), ("k", 1.0, 3.0), ("k", 2.0, 3.5)])
    assert acc["k"] == [3, 4.5, 3.5]
