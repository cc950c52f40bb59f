"""QServe target accuracy: WikiText-2 perplexity of SmolLM2-135M as W8A8, W4A8 and W4A8KV4 artifacts (per channel
and g64), each QoQ phase switched off in turn so that every phase is shown to help (or not) by a measured row.

Every row is compiled to an artifact on disk and evaluated by the CPU reference of QServe's kernels (int8 per-token
activations, integer GEMM, fp16 epilogue, KV cache quantized per token and head after RoPE). g64 is not a group
size QServe's kernel takes (576 is not a multiple of 128): those artifacts load in dcc's runtime only.
Prints a table and writes JSON.

    python bench/qserve_accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --eval ../shared/assets/wikitext2_raw_test/wiki.test.raw
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dcc.api import CompileOptions
from dcc.compiler.calib_data import bos_token, load_tokenizer, tokenize_file, windows
from dcc.models.loader import LazyModel
from dcc.runtime.evaluate import perplexity
from dcc.runtime.reference import build_model
from dcc.targets.qserve.pipeline import pipeline, qoq_steps

import _results  # bench/_results.py: the results' JSON format
from _compiled import compiled  # bench/_compiled.py

ALL_ON = dict(rotate=True, smooth=True, smooth_attention=True, reorder=True, clip=True, gptq=True)


def rows_for(which: set[str], ablate_all: bool = False):
    """(name, bits, group, kv bits, steps) per row. QoQ phases are switched off one at a time;
    the W4A8 rows (16-bit cache) show RTN, QoQ and QoQ without rotation and without GPTQ."""
    rows = []
    if "w8a8" in which:
        rows += [("W8A8 RTN", 8, 0, 16, pipeline("rtn", 8, 0, None)),
                 ("W8A8 SmoothQuant a=0.5", 8, 0, 16, pipeline("smoothquant", 8, 0, None)),
                 ("W8A8 SmoothQuant searched", 8, 0, 16, qoq_steps(True, rotate=False, smooth_attention=False,
                                                                   gptq=False)),
                 ("W8A8 rotation + SmoothQuant searched", 8, 0, 16, qoq_steps(True, smooth_attention=False,
                                                                              gptq=False)),
                 ("W8A8 QoQ (rotation, searched smoothing, GPTQ)", 8, 0, 16, qoq_steps(True, smooth_attention=False))]
    for kv in (16, 4):
        for gs in (64, 0):
            key = f"{'kv4' if kv == 4 else 'w4a8'}-{'g64' if gs else 'chn'}"
            if key not in which:
                continue
            tag = f"W4A8{'KV4' if kv == 4 else ''} {'g64' if gs else 'per-channel'}"
            base = {**ALL_ON, "smooth_attention": kv == 4, "kv": kv == 4}
            rows.append((f"{tag} RTN", 4, gs, kv, pipeline("rtn", 4, gs, None)))
            rows.append((f"{tag} QoQ", 4, gs, kv, qoq_steps(grouped=gs > 0, **base)))
            # the phases the issue asks to be shown (SmoothAttention only acts on a quantized cache); --ablate-all
            # adds smoothing, clipping and reordering
            offs = ("rotate",) + (("smooth_attention",) if kv == 4 else ()) + ("gptq",)
            if ablate_all:
                offs += ("smooth", "clip") + (("reorder",) if gs else ())
            for off in offs:
                rows.append((f"{tag} QoQ without {off}", 4, gs, kv, qoq_steps(grouped=gs > 0, **{**base, off: False})))
            if kv == 4:   # SmoothAttention at QoQ's fixed alpha 0.5 instead of the per-layer search
                rows.append((f"{tag} QoQ, SmoothAttention alpha 0.5 (not searched)", 4, gs, kv,
                             qoq_steps(grouped=gs > 0, **base, attention_search=False)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default="w8a8,w4a8-g64,w4a8-chn,kv4-g64,kv4-chn",
                    help="which row groups (w8a8, w4a8-g64, w4a8-chn, kv4-g64, kv4-chn)")
    ap.add_argument("--ablate-all", action="store_true", help="also rows without smoothing, clipping, reordering")
    ap.add_argument("--skip", default=None, help="skip these rows (exact names, separated by ';')")
    ap.add_argument("--only", default=None, help="run only these rows (exact names, separated by ';')")
    ap.add_argument("--out", default="bench/results/qserve_accuracy.json")
    args = ap.parse_args()

    lm = LazyModel(args.model)
    tok = load_tokenizer(lm.path)   # windows as `dcc eval` cuts them: after the BOS where the tokenizer adds one
    w = windows(tokenize_file(args.eval, tok), args.windows, args.seq_len, args.eval, bos=bos_token(tok))
    results = [{"row": "float", "ppl": perplexity(lm.materialize_all(), w, progress=False)["ppl"], "compile_s": 0.0}]
    del lm
    print(f"float: {results[0]['ppl']:.2f}", flush=True)
    for name, bits, gs, kv, steps in rows_for(set(args.rows.split(",")), args.ablate_all):
        if (args.only and name not in args.only.split(";")) or (args.skip and name in args.skip.split(";")):
            continue
        opts = CompileOptions(target="qserve", bits=bits, group_size=gs, kv_bits=kv, calib=args.calib,
                              steps=steps, progress=False, force=True)
        with compiled(args.model, opts) as (_, art, secs):
            ppl = perplexity(build_model(art), w, progress=False)["ppl"]
            engines = art.manifest["engines"]
        results.append({"row": name, "bits": bits, "group_size": gs, "kv_bits": kv, "ppl": ppl, "compile_s": secs,
                        "passes": [s.name for s in steps], "engines": engines})
        print(f"{name}: {ppl:.2f} ({secs:.0f}s; {' -> '.join(s.name for s in steps)})", flush=True)
    print()
    print(f"| row | WikiText-2 ppl ({args.windows}x{args.seq_len}) | passes | loads in | compile s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['ppl']:.2f} | {' -> '.join(r.get('passes', [])) or '-'} | "
              f"{', '.join(r.get('engines', [])) or '-'} | {r['compile_s']:.0f} |")
    out = _results.write(Path(args.out).stem, results, out=args.out, args=vars(args))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
