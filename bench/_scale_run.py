"""One measured child process for bench/scale.py: wall time, the child's host peak RSS (its VmHWM, read from /proc while
it runs, as bench/memory.py does), the GPU memory in use as nvidia-smi reports it (polled; it includes the CUDA
context and the allocator's cache), and the `SCALE {json}` events the child prints (per-block times, its own
torch.cuda peak). A child past its time limit is killed with its process group; what it reported so far is kept."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

EVENT = "SCALE "


def hwm_mb(pid: int) -> float | None:
    """VmHWM (peak resident set since exec) of a live process, in MiB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def gpu_used_mb() -> float | None:
    """Memory in use on GPU 0 (all processes), from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class _GpuPoller(threading.Thread):
    """nvidia-smi every `period` seconds in a thread (each call takes tens of ms, too slow for the RSS loop)."""

    def __init__(self, period: float):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            used = gpu_used_mb()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self.stop.wait(self.period)


def run(cmd: list[str], env: dict, timeout: float, log: Path | None = None, gpu: bool = True) -> dict:
    """Run `cmd`; returns rc (None when killed at the limit), timed_out, wall_s, peak_rss_mb, the GPU's memory in
    use before and at its peak while the child ran (nvidia-smi, MiB), the child's events, the output's tail and
    its whole text."""
    base = gpu_used_mb() if gpu else None
    poller = _GpuPoller(0.5) if gpu and base is not None else None
    with tempfile.TemporaryFile("w+") as out:
        t = time.perf_counter()
        # its own process group (to kill it with what it started), not its own session: a session outlives the
        # command that started it on the GPU machine, a group in the command's session does not
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, process_group=0)
        if poller:
            poller.start()
        peak, timed_out = 0.0, False
        while p.poll() is None:
            peak = max(peak, hwm_mb(p.pid) or 0.0)
            if time.perf_counter() - t > timeout:
                timed_out = True
                _kill(p)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t
        if poller:
            poller.stop.set()
            poller.join()
        out.seek(0)
        text = out.read()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    events = []
    for line in text.splitlines():
        if line.startswith(EVENT):
            try:
                events.append(json.loads(line[len(EVENT):]))
            except ValueError:
                pass
    return {"rc": None if timed_out else p.returncode, "timed_out": timed_out, "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak), "gpu_used_before_mb": base,
            "gpu_used_peak_mb": poller.peak if poller else None, "events": events,
            "tail": [ln for ln in text.splitlines() if not ln.startswith(EVENT)][-15:], "text": text}


def _kill(p: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (dcc's handlers unwind and remove the partial artifact), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
