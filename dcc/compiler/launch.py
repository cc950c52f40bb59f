"""`dcc compile --procs N` / `--gpus N`: start N ranks of the dcc command on this machine, as torchrun would (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and stop the whole job with one line when a rank fails.

Rank 0's stdout and stderr are the launcher's own (its progress and its error line show as in a single-process
run); the other ranks' stdout is discarded and their stderr goes to a file in the status folder, kept for the
failure line. Each rank records the block it is compiling in that folder (write_status), so that a rank that dies
-- an exception, the out-of-memory killer, a crashed kernel -- is reported as

    dcc: rank 1 failed at block model.layers.2: <its last error line>

after the others were sent SIGTERM (SIGKILL after GRACE_S): ranks blocked in a collective with a dead peer would
otherwise wait for the process group's timeout. The ranks run in their own session, so Ctrl-C reaches the launcher
only, which forwards SIGTERM (a second Ctrl-C: SIGKILL); they also get SIGTERM if the launcher itself is killed."""
from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

GRACE_S = 10.0   # between SIGTERM and SIGKILL for the surviving ranks
STATUS_ENV = "DCC_STATUS_DIR"
FAULT_ENV = "DCC_FAULT"   # "RANK:BLOCK": that rank fails as it reaches that block (the tests' stand-in for a crash)
STOPPED = "stopped"       # written in the status folder before the launcher stops the ranks after a failure
_TAIL_BYTES = 64 * 1024   # how much of a rank's stderr is read for its last line
_PR_SET_PDEATHSIG = 1


def write_status(block: str) -> None:
    """In a rank: record that it is now at `block`, atomically, in $DCC_STATUS_DIR/rank<RANK>.json (no-op when the
    rank was not started by launch)."""
    folder = os.environ.get(STATUS_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    path = Path(folder) / f"rank{rank}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rank": rank, "block": block}))
    os.replace(tmp, path)   # a reader sees the old status or the new one, never half a file
    if os.environ.get(FAULT_ENV) == f"{rank}:{block}":
        raise RuntimeError(f"{FAULT_ENV}: process {rank} stopped at block {block}")


def stopped_by_launcher() -> bool:
    """In a rank: whether the launcher is stopping this job because another rank failed (the launcher's line
    says why; this rank's own "interrupted" line would only repeat it)."""
    folder = os.environ.get(STATUS_ENV)
    return bool(folder) and (Path(folder) / STOPPED).exists()


def lost_peer(e: BaseException, wait_s: float = 5.0) -> bool:
    """In a rank: whether error e is this rank losing a peer that failed first (a collective's connection closed
    under it), which the launcher is about to report; waits up to wait_s for the launcher to say so."""
    if not os.environ.get(STATUS_ENV):
        return False
    text = f"{type(e).__name__}: {e}"
    if not any(k in text for k in ("DistBackendError", "DistNetworkError", "gloo", "NCCL", "Connection closed",
                                   "Connection reset")):
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if stopped_by_launcher():
            return True
        time.sleep(0.05)
    return False


def read_status(folder: Path | str, rank: int) -> str | None:
    """The block rank `rank` recorded last, or None if it recorded none."""
    try:
        return json.loads((Path(folder) / f"rank{rank}.json").read_text())["block"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_procs(n: int, device: str) -> None:
    """ValueError in one sentence unless n ranks can run on `device`."""
    if n < 1 or n > 8 or n & (n - 1):
        raise ValueError(f"the number of processes must be 1, 2, 4 or 8 (a power of two up to 8), got {n}")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"data-parallel calibration runs on cpu or cuda, not {device!r}")
    if kind == "cuda":
        import torch   # here only: the launcher itself needs no torch, and importing it takes a second
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > count:
            raise ValueError(f"{n} ranks need {n} CUDA devices, this machine has {count}")


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _death_signal() -> Callable[[], None] | None:
    """A function for the child to run before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux's
    prctl; None elsewhere). Looked up in the parent: the forked child should only call it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def last_line(path: Path) -> str | None:
    """The last non-empty line of a file (\\r counts as a line end: progress bars), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1] if lines else None


def _reason(rc: int, stderr_file: Path | None) -> str:
    """What a failed rank said: its signal, or its last error line without the CLI's own "dcc: error: " prefix."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    line = last_line(stderr_file) if stderr_file is not None else None
    if line is None:
        return f"exit status {rc}" + (" (its messages are above)" if stderr_file is None else "")
    return line.removeprefix("dcc: error: ")


class _Ranks:
    """The running ranks: SIGTERM each at most once (a second one would cut its cleanup short), and their exits in
    the order they happened (one waiter thread per rank), so that the rank that died first is the one reported, not
    a peer that failed a moment later in a collective with it."""

    def __init__(self, procs: list[subprocess.Popen], folder: Path):
        self.procs, self.folder = procs, folder
        self.termed: set[int] = set()
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()
        for rank, p in enumerate(procs):
            threading.Thread(target=lambda r=rank, q=p: self.exits.put((r, q.wait())), daemon=True).start()

    def terminate(self) -> None:
        for rank, p in enumerate(self.procs):
            if rank not in self.termed and p.returncode is None:
                self.termed.add(rank)
                p.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.kill()

    def watch(self, signals: list[int]) -> tuple[int, int] | None:
        """Wait for every rank; after the first failure (or a signal to the launcher) stop the others, SIGKILL
        after GRACE_S. Returns the first failed (rank, exit code), or None."""
        failed, done, deadline = None, 0, None
        while done < len(self.procs):
            if (failed is not None or signals) and deadline is None:
                if not signals:
                    (self.folder / STOPPED).touch()
                self.terminate()
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                deadline = float("inf")
            try:
                rank, rc = self.exits.get(timeout=0.05)
            except queue.Empty:
                continue
            done += 1
            if rc != 0 and failed is None and not signals:
                failed = (rank, rc)
        return failed


def _start(procs: list[subprocess.Popen], cmd: list[str], base: dict[str, str], err_files: list[Path | None],
           signals: list[int]) -> None:
    """Start the ranks into `procs` in rank order (fewer if the launcher got a signal meanwhile)."""
    pre_exec = _death_signal()
    for rank, err_path in enumerate(err_files):
        if signals:
            return
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        err = None if err_path is None else open(err_path, "wb")
        try:
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=None if rank == 0 else subprocess.DEVNULL, stderr=err,
                                          start_new_session=True, preexec_fn=pre_exec))
        finally:
            if err is not None:
                err.close()   # the child holds its own copy


def launch(argv: list[str], n: int, device: str, *, command: list[str] | None = None,
           status_dir: Path | None = None) -> int:
    """Run `command + argv` (default: this Python's `-m dcc`) as n ranks; the exit code of the job: 0 when every
    rank succeeded, else the failed rank's (1 for a signal), 128 + the signal when the launcher was interrupted."""
    check_procs(n, device)
    command = [sys.executable, "-m", "dcc"] if command is None else list(command)
    own_dir = status_dir is None
    folder = Path(tempfile.mkdtemp(prefix="dcc-ranks-")) if own_dir else Path(status_dir)
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ, WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    base[STATUS_ENV] = str(folder)
    sys.stdout.flush()   # what the launcher printed comes before what rank 0 prints on the same stream
    sys.stderr.flush()
    err_files: list[Path | None] = [None] + [folder / f"rank{rank}.stderr" for rank in range(1, n)]
    procs: list[subprocess.Popen] = []
    signals: list[int] = []
    ranks = None

    def on_signal(signum, frame):
        signals.append(signum)
        if ranks is None:
            return   # still starting them: watch() terminates them
        if len(signals) == 1:
            ranks.terminate()
        else:
            ranks.kill()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            _start(procs, command + list(argv), base, err_files, signals)
        except BaseException:   # a command that cannot start: no rank may outlive the launcher
            for p in procs:
                p.kill()
                p.wait()
            raise
        ranks = _Ranks(procs, folder)
        failed = ranks.watch(signals)
        if signals:
            return 128 + signals[0]
        if failed is None:
            return 0
        rank, rc = failed
        block = read_status(folder, rank)
        where = f"at block {block}" if block is not None else "before the first block"
        print(f"dcc: rank {rank} failed {where}: {_reason(rc, err_files[rank])}", file=sys.stderr, flush=True)
        return rc if rc > 0 else 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
