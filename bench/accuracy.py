"""Accuracy benchmark: WikiText-2 perplexity of SmolLM2-135M compiled with RTN / AWQ / GPTQ at 4 and 3 bits.

4-bit rows are measured on the artifact itself (compiled to disk, decoded by the CPU runtime); 3-bit rows have no
TinyChat layout, so they are the in-memory fake-quant model (same passes, same numerics, nothing written).
Prints a table and writes JSON.

    python bench/accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --eval ../shared/assets/wikitext2_raw_test/wiki.test.raw
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dcc.api import CompileOptions, block0_inputs, calibration_ids
from dcc.compiler.calib_data import bos_token, load_tokenizer, tokenize_file, windows
from dcc.compiler.sequential import compile_blocks
from dcc.models.loader import LazyModel
from dcc.runtime.evaluate import perplexity
from dcc.runtime.reference import build_model
from dcc.ir.formats import QuantSpec
from dcc.targets.tinychat.pipeline import pipeline
from dcc.targets.tinychat.target import zero_for

import _results  # bench/_results.py: the results' JSON format
from _compiled import compiled  # bench/_compiled.py


def fake_quant_ppl(model: str, opts: CompileOptions, w: torch.Tensor) -> tuple[float, float]:
    lm = LazyModel(model)
    # the same numerics as the 4-bit layout (w = q*s + sz per group), at opts.bits
    spec = QuantSpec(dtype=f"int{opts.bits}", symmetric=False, group_size=opts.group_size, scale_dtype="float16",
                     zero_mode="float" if zero_for(opts.zero, opts.algo) == "float" else "scaled")

    def assign(block):
        for lin in block.linears.values():
            lin.spec = spec

    t = time.perf_counter()
    compile_blocks(lm, pipeline(opts.algo), block0_inputs(lm, calibration_ids(lm, opts)), assign, progress=False,
                   release=False)
    secs = time.perf_counter() - t
    return perplexity(lm.model, w, progress=False)["ppl"], secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--algos", default="rtn,awq,gptq,awq+gptq")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--zero", default="float", choices=["auto", "float", "integer"])
    ap.add_argument("--out", default="bench/results/accuracy.json")
    args = ap.parse_args()

    lm = LazyModel(args.model)
    tok = load_tokenizer(lm.path)   # windows as `dcc eval` cuts them: after the BOS where the tokenizer adds one
    w = windows(tokenize_file(args.eval, tok), args.windows, args.seq_len, args.eval, bos=bos_token(tok))
    rows = [{"method": "float", "bits": 16, "ppl": perplexity(lm.materialize_all(), w, progress=False)["ppl"],
             "measured_on": "source model", "compile_s": 0.0}]
    del lm
    print(f"float: {rows[0]['ppl']:.2f}", flush=True)
    for bits in map(int, args.bits.split(",")):
        for algo in args.algos.split(","):
            opts = CompileOptions(target="tinychat", algo=algo, bits=bits, group_size=args.group_size,
                                  calib=args.calib, calib_chunks=16, calib_seq_len=256, zero=args.zero,
                                  progress=False, force=True)
            if bits == 4:
                with compiled(args.model, opts) as (_, art, secs):
                    ppl = perplexity(build_model(art), w, progress=False)["ppl"]
                where = "artifact (decoded)"
            else:
                ppl, secs = fake_quant_ppl(args.model, opts, w)
                where = "fake-quant (no 3-bit layout)"
            rows.append({"method": algo, "zero": args.zero, "bits": bits, "ppl": ppl, "measured_on": where, "compile_s": secs})
            print(f"{algo} w{bits}: {ppl:.2f} ({secs:.0f}s)", flush=True)
    print()
    print(f"| method | zero | bits | group | WikiText-2 ppl ({args.windows}x{args.seq_len}) | measured on | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = "-" if r["bits"] == 16 else args.group_size
        print(f"| {r['method']} | {r.get('zero', '-')} | {r['bits']} | {g} | {r['ppl']:.2f} | {r['measured_on']} | {r['compile_s']:.1f} |")
    out = _results.write(Path(args.out).stem, rows, out=args.out, args=vars(args))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
