"""Host memory against model depth: peak RSS of `dcc compile`, `dcc validate --model` and `dcc eval --baseline` on
random Llamas of the same width and 8 or 32 blocks (bf16, sharded safetensors). dcc works one block at a time, so
the peak should not grow with the number of blocks (goal: 32 blocks within 10 % of 8 blocks). Each command runs in
its own process; its peak RSS is its VmHWM, read from /proc while it runs.

    python bench/memory.py --hidden 1024 --layers 8,32 --out bench/results/memory.json
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

import _results  # bench/_results.py: the results' JSON format

VOCAB = 4096


def build(folder: Path, hidden: int, layers: int, seed: int) -> None:
    """A random bf16 Llama (GQA 4:1, MLP 2.75x) saved in 100 MB shards, as large checkpoints are."""
    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 64 * 64,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                        max_position_embeddings=1024, initializer_range=0.02, torch_dtype="bfloat16")
    model = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(folder, max_shard_size="100MB")


def _hwm_kb(pid: int) -> int | None:
    """The process's VmHWM (peak resident set of its memory map since exec) from /proc, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, the last line of output) of one command in a fresh process. The peak is the child's
    VmHWM, read every 20 ms while it runs: getrusage's ru_maxrss would include this process's own high-water mark,
    which a child inherits through fork and exec."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peak = 0
        while p.poll() is None:
            peak = max(peak, _hwm_kb(p.pid) or 0)
            time.sleep(0.02)
        log.seek(0)
        out = log.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    return peak / 1024, time.perf_counter() - t, out.strip().splitlines()[-1] if out.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--target", default="tinychat")
    ap.add_argument("--algo", default="rtn")
    ap.add_argument("--calib-chunks", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args()
    dcc = [sys.executable, "-m", "dcc"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (args.calib_chunks * args.calib_seq_len * 2,), generator=g)
        (d / "ids.txt").write_text(" ".join(map(str, ids.tolist())) + "\n")
        for layers in map(int, args.layers.split(",")):
            model, art = d / f"m{layers}", d / f"a{layers}"
            # built in its own process, so that this one stays small (see LAUNCHER)
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=build, args=(model, args.hidden, layers, 0))
            proc.start()
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"building the {layers}-block model failed")
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2 ** 20
            steps = {
                "compile": dcc + ["compile", str(model), "-o", str(art), "--target", args.target, "--algo", args.algo,
                                  "--calib", str(d / "ids.txt"), "--calib-chunks", str(args.calib_chunks),
                                  "--calib-seq-len", str(args.calib_seq_len), "-q"],
                "validate --model": dcc + ["validate", str(art), "--model", str(model), "--tokens", "256", "-q"],
                "eval --baseline": dcc + ["eval", str(art), "--ppl", str(d / "ids.txt"), "--seq-len", "256",
                                          "--windows", "2", "--baseline", str(model), "-q"],
            }
            for what, cmd in steps.items():
                rss, secs, last = run(cmd)
                rows.append({"command": what, "layers": layers, "hidden": args.hidden, "model_mb": round(size),
                             "peak_rss_mb": round(rss), "seconds": round(secs, 1)})
                print(f"{what:18} {layers:3} blocks ({size:6.0f} MB bf16): peak RSS {rss:7.0f} MB, {secs:6.1f} s",
                      flush=True)
            _results.write(Path(args.out).stem, rows, out=args.out, args=vars(args))
    by = {(r["command"], r["layers"]): r["peak_rss_mb"] for r in rows}
    depths = sorted({r["layers"] for r in rows})
    print(f"\n| command | " + " | ".join(f"{n} blocks" for n in depths) + " | growth |")
    print("|---|" + "---|" * (len(depths) + 1))
    for what in dict.fromkeys(r["command"] for r in rows):
        vals = [by[(what, n)] for n in depths]
        print(f"| {what} | " + " | ".join(f"{v} MB" for v in vals) + f" | {vals[-1] / vals[0] - 1:+.1%} |")


if __name__ == "__main__":
    main()
