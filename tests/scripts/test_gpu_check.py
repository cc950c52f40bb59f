"""scripts/gpu_check.sh (the GPU side of CI) refuses clearly where it cannot run: an unknown family, or no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _run(**env):
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_an_unknown_family_is_named_and_refused():
    r = _run(FAMILIES="attn w4a3")
    assert r.returncode == 2 and "unknown family w4a3" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_builds_nothing():
    r = _run(FAMILIES="attn")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "build" not in r.stdout
