"""The launcher of `dcc compile --procs N` (dcc/compiler/launch.py): the ranks get torchrun's variables, rank 0's
output passes through, and a rank that fails (an error, a SIGKILL) stops the others and is reported in one line
naming it and the block it was at; Ctrl-C and a killed launcher stop the ranks too. The ranks are a small script
(RANK_SCRIPT) that records what it saw in a folder and, when it is told to wait, waits to be stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcc.compiler.launch import last_line, launch, read_status, write_status

RANK_SCRIPT = '''
import json, os, signal, sys, time
from pathlib import Path
from dcc.compiler.launch import write_status

out, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])

def on_term(signum, frame):
    (out / f"terminated{rank}").write_text("")
    sys.exit(143)

def wait_for(name):
    for _ in range(3000):
        if (out / name).exists():
            return
        time.sleep(0.01)

signal.signal(signal.SIGTERM, on_term)
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DCC_STATUS_DIR")
(out / f"env{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in names}))
print(f"stdout of rank {rank}", flush=True)
print(f"stderr of rank {rank}", file=sys.stderr, flush=True)
write_status(f"model.layers.{rank}")
(out / f"ready{rank}").write_text("")
if mode == "ok":
    sys.exit(0)
if rank == int(sys.argv[3]):
    for r in range(int(os.environ["WORLD_SIZE"])):
        wait_for(f"ready{r}")   # the others' SIGTERM handlers are installed: their stop is observable
    if mode == "fail":
        write_status("model.layers.2")
        print("progress 50%\\rprogress 100%", file=sys.stderr)
        print(sys.argv[4] + "\\n\\n", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
(out / f"finished{rank}").write_text("")
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "rank.py"
    path.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return [sys.executable, str(path)], out


def wait_for(path: Path) -> None:
    """Wait (at most a minute) for a rank's marker file."""
    for _ in range(6000):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path.name} never appeared")


def test_ranks_get_torchruns_variables_and_rank_0s_output(script, capfd):
    command, out = script
    assert launch([str(out), "ok"], 4, "cpu", command=command) == 0
    envs = [json.loads((out / f"env{r}.json").read_text()) for r in range(4)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"]) for e in envs] == \
        [(str(r), str(r), "4", "127.0.0.1") for r in range(4)]
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and 0 < int(envs[0]["MASTER_PORT"]) < 65536
    assert len({e["DCC_STATUS_DIR"] for e in envs}) == 1
    assert not Path(envs[0]["DCC_STATUS_DIR"]).exists()   # the launcher's own folder is removed
    captured = capfd.readouterr()
    assert captured.out == "stdout of rank 0\n" and captured.err == "stderr of rank 0\n"


def test_a_given_status_folder_keeps_each_ranks_block(script, tmp_path):
    command, out = script
    assert launch([str(out), "ok"], 2, "cpu", command=command, status_dir=tmp_path / "status") == 0
    assert [read_status(tmp_path / "status", r) for r in range(3)] == ["model.layers.0", "model.layers.1", None]


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("said, reported", [
    ("RuntimeError: NaN in the Hessian of model.layers.2.mlp",) * 2,
    ("dcc: error: out of GPU memory", "out of GPU memory")])   # the CLI's own prefix is not repeated
def test_a_failed_rank_stops_the_others_and_is_named_in_one_line(script, capfd, size, said, reported):
    command, out = script
    assert launch([str(out), "fail", "1", said], size, "cpu", command=command) == 3
    captured = capfd.readouterr()
    assert captured.err.splitlines() == ["stderr of rank 0", f"dcc: rank 1 failed at block model.layers.2: {reported}"]
    assert captured.out == "stdout of rank 0\n"   # the other ranks' stdout is discarded
    for r in range(size):
        if r != 1:
            assert (out / f"terminated{r}").exists() and not (out / f"finished{r}").exists()


def test_a_rank_killed_by_a_signal(script, capfd):
    command, out = script
    assert launch([str(out), "kill", "1"], 2, "cpu", command=command) == 1
    assert capfd.readouterr().err.splitlines()[-1] == "dcc: rank 1 failed at block model.layers.1: killed by SIGKILL"
    assert (out / "terminated0").exists()


def test_rank_0s_failure_points_at_its_own_messages(script, capfd):
    command, out = script
    assert launch([str(out), "fail", "0", "ValueError: bad recipe"], 2, "cpu", command=command) == 3
    assert capfd.readouterr().err.split("\n") == [
        "stderr of rank 0", "progress 50%\rprogress 100%", "ValueError: bad recipe", "", "",
        "dcc: rank 0 failed at block model.layers.2: exit status 3 (its messages are above)", ""]
    assert (out / "terminated1").exists()


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_stopping_the_launcher_stops_the_ranks(script, how):
    command, out = script
    # a launcher killed by SIGKILL cannot remove its status folder: give it one that pytest removes
    code = "import sys; from dcc.compiler.launch import launch; sys.exit(launch(sys.argv[4:], 2, 'cpu', " \
           "command=sys.argv[1:3], status_dir=sys.argv[3]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *command, str(out.parent / "status"), str(out), "wait", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for r in range(2):
            wait_for(out / f"ready{r}")
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # Ctrl-C: the launcher forwards SIGTERM and exits 128 + SIGINT; killed, it cannot, but the ranks' parent-death
    # signal is SIGTERM
    assert proc.returncode == (130 if how == "SIGINT" else -signal.SIGKILL)
    assert "failed" not in err
    for r in range(2):
        wait_for(out / f"terminated{r}")
        assert not (out / f"finished{r}").exists()


@pytest.mark.parametrize("n", [0, 3, 6, 16])
def test_the_number_of_processes_is_checked(n):
    with pytest.raises(ValueError, match=f"^the number of processes must be 1, 2, 4 or 8 .*, got {n}$"):
        launch([], n, "cpu")


def test_cuda_ranks_need_as_many_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="^2 ranks need 2 CUDA devices, this machine has 1$"):
        launch([], 2, "cuda")
    with pytest.raises(ValueError, match="runs on cpu or cuda, not 'mps'"):
        launch([], 2, "mps")


def test_write_status_replaces_the_rank_file(monkeypatch, tmp_path):
    monkeypatch.delenv("DCC_STATUS_DIR", raising=False)
    write_status("model.layers.0")   # not started by launch: nothing to record, no error
    monkeypatch.setenv("DCC_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    write_status("model.layers.0")
    write_status("model.layers.1")
    assert read_status(tmp_path, 3) == "model.layers.1" and read_status(tmp_path, 0) is None
    assert os.listdir(tmp_path) == ["rank3.json"]   # no temporary file left behind


def test_last_line_counts_carriage_returns_as_line_ends(tmp_path):
    f = tmp_path / "err"
    f.write_bytes(b"Traceback\nRuntimeError: boom\nprogress 10%\rprogress 20%\r\n\n")
    assert last_line(f) == "progress 20%"
    f.write_bytes(b"\n \n")
    assert last_line(f) is None and last_line(tmp_path / "missing") is None
