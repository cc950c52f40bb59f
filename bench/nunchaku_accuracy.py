"""W4A4 accuracy benchmark (Nunchaku target): WikiText-2 perplexity of SmolLM2-135M compiled to Nunchaku's INT4
W4A4 layout with RTN, smoothing alone, and SVDQuant (smoothing + a low-rank branch of rank 16 / 32 / 64), each
measured on the artifact itself (decoded, run by the CPU reference of Nunchaku's kernel: per-token 64-group int4
activations, 16-bit group accumulation). The result is written after every row (a long run keeps what it measured).

    python bench/nunchaku_accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --eval ../shared/assets/wikitext2_raw_test/wiki.test.raw
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dcc.api import CompileOptions, compile_model
from dcc.compiler.calib_data import load_tokenizer, tokenize_file, windows
from dcc.models.loader import LazyModel
from dcc.runtime.artifact import load_artifact
from dcc.runtime.evaluate import perplexity
from dcc.runtime.reference import build_model

import _results  # bench/_results.py: the results' JSON format

# (row, algo, rank), the headline first
ROWS = {"svdquant-r32": ("SVDQuant rank 32", "svdquant", 32), "rtn": ("W4A4 RTN", "rtn", 32),
        "smooth": ("+ smoothing (no branch)", "smoothquant", 32), "svdquant-r16": ("SVDQuant rank 16", "svdquant", 16),
        "svdquant-r64": ("SVDQuant rank 64", "svdquant", 64),
        "svdquant-gptq-r32": ("SVDQuant rank 32, GPTQ on the residual", "svdquant-gptq", 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--out", default="bench/results/nunchaku_accuracy.json")
    args = ap.parse_args()

    lm = LazyModel(args.model)
    w = windows(tokenize_file(args.eval, load_tokenizer(lm.path)), args.windows, args.seq_len, args.eval)
    del lm
    # rows measured before (another --rows) are kept, those measured again replaced
    old = json.loads(Path(args.out).read_text())["rows"] if Path(args.out).is_file() else []
    names = {ROWS[k][0] for k in args.rows.split(",")}
    rows = [r for r in old if r["method"] not in names]
    for key in args.rows.split(","):
        name, algo, rank = ROWS[key]
        opts = CompileOptions(target="nunchaku", algo=algo, rank=rank, calib=args.calib, calib_chunks=16,
                              calib_seq_len=256, progress=False, force=True)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            out = compile_model(args.model, str(Path(d) / "a"), opts, log=lambda m: None)
            secs = time.perf_counter() - t
            t = time.perf_counter()
            ppl = perplexity(build_model(load_artifact(out)), w, progress=False)["ppl"]
            eval_s = time.perf_counter() - t
        rows.append({"method": name, "algo": algo, "rank": rank if algo.startswith("svdquant") else 0, "ppl": ppl,
                     "measured_on": "artifact (CPU reference of the W4A4 kernel)", "compile_s": round(secs, 1),
                     "eval_s": round(eval_s, 1)})
        print(f"{name}: {ppl:.2f} (compile {secs:.0f}s, eval {eval_s:.0f}s)", flush=True)
        _results.write(Path(args.out).stem, rows, out=args.out, args=vars(args))
    print(f"\n| method | rank | WikiText-2 ppl ({args.windows}x{args.seq_len}) | compile s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['rank'] or '-'} | {r['ppl']:.2f} | {r['compile_s']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
