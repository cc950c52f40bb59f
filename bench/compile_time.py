"""Compile-time benchmark: wall time, per-pass time and peak memory of `dcc compile` (a fresh process per run, so the
peak RSS is the compile's own), on the default model. Prints a table and writes JSON.

    python bench/compile_time.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --algos awq,gptq,rtn
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the results' JSON format


def run_once(model: str, calib: str, algo: str, group_size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "dcc", "compile", model, "--algo", algo, "--group-size", str(group_size),
               "--calib", calib, "-o", str(Path(d) / "a"), "-q"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"compile failed: {p.stderr.strip().splitlines()[-1]}")
    m = re.search(r"compiled \d+ blocks in ([\d.]+)s \(passes: (.*?)\); peak RSS (\d+) MB", p.stderr)
    passes = dict((k, float(v)) for k, v in re.findall(r"([\w+]+) ([\d.]+)s", m.group(2))) if m else {}
    return {"algo": algo, "wall_s": round(wall, 1), "blocks_s": float(m.group(1)) if m else None,
            "passes_s": passes, "peak_rss_mb": float(m.group(3)) if m else None}   # the compile's own getrusage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--algos", default="awq,gptq,rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compile_time.json")
    args = ap.parse_args()
    # convert the GGUF once outside the timed runs (a one-time step, cached)
    subprocess.run([sys.executable, "-c", f"from dcc.models.loader import resolve_model_path; "
                    f"resolve_model_path({args.model!r})"], check=True)
    rows = []
    for algo in args.algos.split(","):
        rows.append(run_once(args.model, args.calib, algo, args.group_size, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| algo | wall s (whole command) | blocks s | per pass s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        passes = ", ".join(f"{k} {v:.1f}" for k, v in r["passes_s"].items())
        print(f"| {r['algo']} | {r['wall_s']} | {r['blocks_s']} | {passes} | {r['peak_rss_mb']:.0f} |")
    out = _results.write(Path(args.out).stem, rows, out=args.out, args=vars(args))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
