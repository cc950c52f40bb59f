"""`dcc compile --procs N` (issue 31): the calibration batch split over N processes (gloo on the CPU) gives the
artifact one process gives, byte for byte, for each causal-LM target and algorithm family (QoQ with smoothing,
SmoothAttention, clip and GPTQ; AWQ; SVDQuant's low-rank branch); a process that fails stops the job with one line
naming it and its block and leaves no output; bad launches are refused in one line. Each compile runs in its own
processes (the launcher starts `python -m dcc`)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import decoder_config, save_tiny

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT.parent / "shared" / "assets" / "stories260K" / "hf"


def dcc(*args, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    e.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "dcc", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=600)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of an artifact (weights, config, manifest)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-block Llama (hidden 64, no tokenizer) and 8 calibration windows of 32 tokens."""
    d = tmp_path_factory.mktemp("dist")
    save_tiny(d / "m", decoder_config("llama", layers=3))
    (d / "calib.txt").write_text(" ".join(str((11 * i + 5) % 100) for i in range(8 * 32)))
    return d


def compile_tiny(tiny, out, procs, *flags, env=None):
    return dcc("compile", tiny / "m", *flags, "--calib", tiny / "calib.txt", "--calib-chunks", "8",
               "--calib-seq-len", "32", "-o", out, "-q", "--procs", procs, env=env)


@pytest.mark.parametrize("flags", [
    ("--target", "qserve"),                                              # QoQ: smooth, SmoothAttention, clip, GPTQ
    ("--target", "tinychat", "--algo", "awq", "--group-size", "32"),     # AWQ search, clip, RTN
    ("--target", "nunchaku", "--rank", "16"),                            # SVDQuant: smoothing + low-rank branch
], ids=["qserve", "tinychat-awq", "nunchaku"])
def test_one_two_and_four_processes_give_the_same_bytes(tiny, tmp_path, flags):
    outs = {}
    for n in (1, 2, 4):
        r = compile_tiny(tiny, tmp_path / f"p{n}", n, *flags)
        assert r.returncode == 0, r.stderr
        outs[n] = digest(tmp_path / f"p{n}")
    assert outs[1] == outs[2] == outs[4]
    assert "model.safetensors" in outs[1] or any(k.endswith(".safetensors") for k in outs[1])


def test_stories260k_one_and_two_processes_give_the_same_bytes(tmp_path):
    if not STORIES.is_dir():
        pytest.skip(f"needs ../shared/assets ({STORIES} is absent)")
    calib = tmp_path / "ids.txt"
    calib.write_text(" ".join(str((37 * i + 11) % 512) for i in range(16 * 256)))
    outs = []
    for n in (1, 2):
        out = tmp_path / f"s{n}"
        r = dcc("compile", STORIES, "--target", "qserve", "--calib", calib, "-o", out, "-q", "--unsupported", "keep",
                "--procs", n)
        assert r.returncode == 0, r.stderr
        outs.append(digest(out))
    assert outs[0] == outs[1]


def test_a_failing_process_stops_the_job_naming_it_and_its_block(tiny, tmp_path):
    out = tmp_path / "failed"
    r = compile_tiny(tiny, out, 2, "--target", "tinychat", "--group-size", "32", env={"DCC_FAULT": "1:model.layers.1"})
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dcc: rank")]
    assert lines == ["dcc: rank 1 failed at block model.layers.1: RuntimeError: DCC_FAULT: process 1 stopped at "
                     "block model.layers.1 (set DCC_DEBUG=1 for the traceback)"], r.stderr
    # nothing was written: no artifact, no temporary folder beside it
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".failed")]


@pytest.mark.parametrize("flags, says", [
    (("--procs", "3"), "power of two"),
    (("--procs", "16"), "power of two"),
    (("--procs", "2", "--gpus", "2"), "--gpus or --procs"),
    (("--procs", "2", "--resume"), "--resume"),
], ids=["three", "sixteen", "both", "resume"])
def test_bad_launches_are_refused_in_one_line(tiny, tmp_path, flags, says):
    r = dcc("compile", tiny / "m", "--calib", tiny / "calib.txt", "--calib-chunks", "8", "--calib-seq-len", "32",
            "-o", tmp_path / "o", "-q", *flags)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_fewer_sequences_than_processes_is_refused(tiny, tmp_path):
    r = dcc("compile", tiny / "m", "--calib", tiny / "calib.txt", "--calib-chunks", "1", "--calib-seq-len", "32",
            "-o", tmp_path / "o", "-q", "--group-size", "32", "--procs", "2")
    assert r.returncode != 0 and "fewer than the 2 processes" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
