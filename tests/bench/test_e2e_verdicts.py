"""bench/e2e.py's verdicts (pure): the issue's targets from the rows, and a failing line for any batch whose graph
replay did not give the serial eager run's tokens (a race shows there, not in tokens/s)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import e2e  # noqa: E402  (bench/ is not a package)


def row(model, batch, tps, frac, same=True):
    return {"model": model, "batch": batch, "decode_tokens_per_s": tps, "fraction_of_floor": frac,
            "graph_tokens_equal_serial": same}


def test_targets_met_and_missed():
    rows = [row("dcc tinychat", 1, 380.0, 0.76), row("dcc qserve", 64, 9000.0, 0.3)]
    got = {c["target"]: c["ok"] for c in e2e.verdicts(rows, {"hf bf16": 0.05, "dcc qserve": 0.07}, (1, 64))}
    assert got == {"batch 1 W4A16 decode >= 75% of its byte floor": True,
                   "batch 64 W4A8KV4 >= 10,000 tokens/s": False,
                   "dcc qserve TTFT <= 1.2x bf16 prefill": False}


def test_a_graph_that_differs_from_the_serial_run_fails():
    rows = [row("dcc tinychat", 1, 380.0, 0.76), row("dcc tinychat", 64, 8000.0, 0.4, same=False)]
    bad = [c for c in e2e.verdicts(rows, {}, (1, 64)) if not c["ok"]]
    assert [c["target"] for c in bad] == ["dcc tinychat batch 64: graph tokens equal the serial eager run"]
