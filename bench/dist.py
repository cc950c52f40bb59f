"""Data-parallel calibration (issue 31): `dcc compile` with the calibration batch split over 1, 2, 4, ... processes,
each run in its own launcher; per row the wall time, the speed-up and scaling efficiency against one process, and
the sha256 of the artifact's files (every row must equal the one-process row: the same bytes).

    PYTHONPATH=. python bench/dist.py                                  # stories260K on the CPU (gloo), 1 and 2 processes
    PYTHONPATH=. python bench/dist.py --model M --calib C --gpus 1,2,4,8 --calib-chunks 128 --calib-seq-len 2048

On the CPU every process gets cores // N threads (torch's intra-op threads), so a row measures the split, not
oversubscription. With --gpus each process has one GPU (NCCL). JSON: bench/results/dist_<device>.json."""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the results' JSON format

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "assets" / "stories260K" / "hf"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run(model: str, calib: str, flags: list[str], n: int, gpus: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "a"
        cmd = [sys.executable, "-m", "dcc", "compile", model, "--calib", calib, "-o", str(out), "-q", *flags,
               "--gpus" if gpus else "--procs", str(n)]
        threads = max(1, (os.cpu_count() or 1) // n)
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit(f"bench/dist.py: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        return {"processes": n, "threads_per_process": None if gpus else threads, "wall_s": round(wall, 2),
                "sha256": digest(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(STORIES), help="model folder or GGUF (default: stories260K)")
    ap.add_argument("--calib", default=None, help="calibration file (default: token ids made for stories260K)")
    ap.add_argument("--procs", default="1,2", help="process counts on the CPU (default 1,2)")
    ap.add_argument("--gpus", default=None, help="GPU counts instead (NCCL), e.g. 1,2,4,8")
    ap.add_argument("--targets", default="qserve,tinychat", help="qserve (QoQ) and/or tinychat (AWQ)")
    ap.add_argument("--calib-chunks", default="16")
    ap.add_argument("--calib-seq-len", default="256")
    a = ap.parse_args()
    if not Path(a.model).exists():
        sys.exit(f"bench/dist.py: {a.model} not found (stories260K comes from ../shared/assets)")
    with tempfile.TemporaryDirectory() as d:
        calib = a.calib
        if calib is None:   # stories260K has no tokenizer: token ids
            calib = str(Path(d) / "ids.txt")
            Path(calib).write_text(" ".join(str((37 * i + 11) % 512) for i in range(int(a.calib_chunks) *
                                                                                   int(a.calib_seq_len))))
        counts = [int(v) for v in (a.gpus or a.procs).split(",")]
        rows = []
        for target in a.targets.split(","):
            flags = {"qserve": ["--target", "qserve"], "tinychat": ["--target", "tinychat", "--algo", "awq",
                                                                   "--group-size", "32"]}[target]
            flags += ["--unsupported", "keep", "--calib-chunks", a.calib_chunks, "--calib-seq-len", a.calib_seq_len]
            base = None
            for n in counts:
                r = {"target": target, **run(a.model, calib, flags, n, a.gpus is not None)}
                base = base or r
                r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
                r["efficiency"] = round(r["speedup"] / (n / base["processes"]), 3)
                r["same_bytes_as_first"] = r["sha256"] == base["sha256"]
                rows.append(r)
                print(f"{target:<9} {n} processes: {r['wall_s']:7.1f} s, speed-up {r['speedup']:.2f}, "
                      f"efficiency {r['efficiency']:.2f}, same bytes: {r['same_bytes_as_first']}", flush=True)
    dev = "cuda" if a.gpus else "cpu"
    path = _results.write(f"dist_{dev}", rows, model=Path(a.model).name, calib_chunks=a.calib_chunks,
                          calib_seq_len=a.calib_seq_len)
    print(f"wrote {path}")
    if not all(r["same_bytes_as_first"] for r in rows):
        sys.exit("bench/dist.py: the artifacts differ between process counts")


if __name__ == "__main__":
    main()
