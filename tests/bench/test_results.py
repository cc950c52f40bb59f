"""bench/_results.py: the command a result file records reproduces the run, the runtime's DCC_* knobs included."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _results  # noqa: E402


def test_command_names_the_knobs_it_ran_under(monkeypatch):
    for k in [k for k in os.environ if k.startswith("DCC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(sys, "argv", ["bench/e2e.py", "--batches", "1"])
    assert _results.command() == "python bench/e2e.py --batches 1"
    monkeypatch.setenv("DCC_W4A16_LEAN", "big=w4")
    monkeypatch.setenv("DCC_PDL", "0")
    monkeypatch.setenv("DCC_CACHE", "/tmp/build")   # where the extensions are built: changes nothing measured
    assert _results.command() == "DCC_PDL=0 DCC_W4A16_LEAN=big=w4 python bench/e2e.py --batches 1"
