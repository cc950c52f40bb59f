"""The one format of bench/results/<name>.json: {"commit", "machine", "date", "command", "rows": [...]} plus what a
benchmark adds (its arguments, the device's ceilings, correctness checks). Committed with the commit they measured,
so that the README's tables can be read back from them (bench/readme_tables.py)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """HEAD of the checkout the benchmark runs from, with "-dirty" where tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def machine() -> str:
    """CPU model and core count, and the GPU where torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            desc += f"; GPU {p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}"
    except ImportError:
        pass
    return desc


def command() -> str:
    """The command line that reproduces the run, with the DCC_* variables set for it (the runtime's knobs; not the
    paths of the build cache and of the test suite's model, which change nothing measured)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("DCC_") and k not in ("DCC_CACHE", "DCC_SMOLLM2_GGUF")]
    return " ".join([*env, *(shlex.quote(a) for a in ["python", *sys.argv])])


def write(name: str, rows: list, out: str | Path | None = None, **extra) -> Path:
    """Write bench/results/<name>.json (or `out`) with the header fields, `rows` and `extra`; returns the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    doc = {"commit": commit(), "machine": machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "command": command(),
           "rows": rows, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
