"""W4A4 accuracy benchmark (Nunchaku target): WikiText-2 perplexity of SmolLM2-135M compiled to Nunchaku's INT4
W4A4 layouts (INT4 and NVFP4) with RTN, each ingredient alone (smoothing, rotation) and SVDQuant (smoothing + a
low-rank branch of rank 16 / 32 / 64), against W4A16 g64 (TinyChat AWQ) as the reference; each measured on the
artifact itself (decoded, run by the CPU reference of the engine's kernel: for W4A4, per-token activations in groups
of 64 (INT4) or 16 (NVFP4), 16-bit group accumulation). The result is written after every row (a long run keeps what
it measured); the table says which share of the RTN -> W4A16 perplexity gap each row closes.

    python bench/nunchaku_accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --eval ../shared/assets/wikitext2_raw_test/wiki.test.raw

Gemma-3-270M (scripts/fetch_gemma3.sh) the same way with `--model models/gemma-3-270m.gguf --out
bench/results/nunchaku_accuracy_gemma3.json`; `--device cuda` compiles and evaluates on a GPU (minutes a row instead
of the CPU's half hour).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dcc.api import CompileOptions
from dcc.compiler.calib_data import bos_token, load_tokenizer, tokenize_file, windows
from dcc.models.loader import LazyModel
from dcc.runtime.evaluate import perplexity
from dcc.runtime.reference import build_model

import _results  # bench/_results.py: the results' JSON format
from _compiled import compiled  # bench/_compiled.py


def _rotated_rtn() -> list:
    """W4A4 RTN after QuaRot's residual rotation (fuse_norms + Hadamard): the rotation ingredient alone."""
    from dcc.compiler.pass_manager import Step
    from dcc.passes.fuse_norms import FuseNormsConfig
    from dcc.passes.quantize_activations import QuantizeActivationsConfig
    from dcc.passes.rotate import RotateConfig
    from dcc.passes.rtn import RtnConfig
    return [Step("fuse_norms", FuseNormsConfig()), Step("rotate", RotateConfig()),
            Step("quantize_activations", QuantizeActivationsConfig()), Step("rtn", RtnConfig())]


# key -> (row, target options, pass list or None), the headline first
ROWS = {
    "svdquant-r32": ("SVDQuant rank 32", dict(algo="svdquant", rank=32), None),
    "rtn": ("W4A4 RTN", dict(algo="rtn"), None),
    "smooth": ("+ smoothing (no branch)", dict(algo="smoothquant"), None),
    "rotate": ("+ rotation (no smoothing, no branch)", dict(algo="rtn"), _rotated_rtn),
    "svdquant-r16": ("SVDQuant rank 16", dict(algo="svdquant", rank=16), None),
    "svdquant-r64": ("SVDQuant rank 64", dict(algo="svdquant", rank=64), None),
    "svdquant-gptq-r32": ("SVDQuant rank 32, GPTQ on the residual", dict(algo="svdquant-gptq", rank=32), None),
    "nvfp4-rtn": ("NVFP4 W4A4 RTN", dict(algo="rtn", precision="nvfp4"), None),
    "nvfp4-svdquant-r32": ("NVFP4 SVDQuant rank 32", dict(algo="svdquant", rank=32, precision="nvfp4"), None),
    "w4a16-g64": ("W4A16 g64 (TinyChat AWQ, reference)", dict(target="tinychat", algo="awq", group_size=64), None),
}


def _allow_any_rope() -> None:
    """The W4A16 reference row on a model whose RoPE TinyChat's kernels cannot apply (Gemma 3: per-layer-type
    bases): the target refuses such models, since TinyChat would load the artifact and run it with wrong positions;
    the reference row only needs dcc's runtime, so here (the benchmark alone) the refusal is lifted."""
    from dcc.targets.tinychat import target as tc
    from dcc.targets.tinychat.pipeline import preflight
    tc.TinyChat.preflight = lambda self, lm, spec, opts: preflight(lm, spec, opts.unsupported)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--out", default="bench/results/nunchaku_accuracy.json")
    ap.add_argument("--unsupported", default=None, choices=["error", "keep"],
                    help="layers whose shape the layout cannot take (Gemma-3's K = 640 is fine; keep: 16-bit)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="compile and evaluate here (cuda: calibration on the GPU and "
                    "the same CPU reference of the engine's kernel run with torch on the GPU)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    _allow_any_rope()

    lm = LazyModel(args.model)
    tok = load_tokenizer(lm.path)   # windows as `dcc eval` cuts them: after the BOS where the tokenizer adds one
    w = windows(tokenize_file(args.eval, tok), args.windows, args.seq_len, args.eval, bos=bos_token(tok))
    del lm
    # rows measured before (another --rows) are kept, those measured again replaced
    old = json.loads(Path(args.out).read_text())["rows"] if Path(args.out).is_file() else []
    names = {ROWS[k][0] for k in args.rows.split(",")}
    rows = [r for r in old if r["method"] not in names]
    for key in args.rows.split(","):
        name, given, steps = ROWS[key]
        given = {"target": "nunchaku", **given}
        opts = CompileOptions(**given, calib=args.calib, calib_chunks=16, calib_seq_len=256, progress=False,
                              device=args.device, force=True, steps=steps() if steps else None,
                              unsupported=args.unsupported)
        with compiled(args.model, opts) as (_, art, secs):
            t = time.perf_counter()
            ppl = perplexity(build_model(art, device=args.device), w, device=args.device, progress=False)["ppl"]
            eval_s = time.perf_counter() - t
        algo, rank = given["algo"], given.get("rank", 0)
        rows.append({"method": name, "target": given["target"], "algo": algo, "precision": given.get("precision"),
                     "rank": rank, "ppl": ppl, "measured_on": "artifact (CPU reference of the engine's kernel)"
                       + (f", run by torch on {args.device}" if args.device != "cpu" else ""),
                     "compile_s": round(secs, 1), "eval_s": round(eval_s, 1)})
        print(f"{name}: {ppl:.2f} (compile {secs:.0f}s, eval {eval_s:.0f}s)", flush=True)
        _results.write(Path(args.out).stem, rows, out=args.out, args=vars(args))
    by = {r["method"]: r["ppl"] for r in rows}
    rtn, ref = by.get(ROWS["rtn"][0]), by.get(ROWS["w4a16-g64"][0])
    print(f"\n| method | rank | WikiText-2 ppl ({args.windows}x{args.seq_len}) | share of the RTN -> W4A16 gap closed "
          f"| compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = f"{(rtn - r['ppl']) / (rtn - ref):.0%}" if rtn and ref and rtn != ref else "-"
        print(f"| {r['method']} | {r['rank'] or '-'} | {r['ppl']:.2f} | {share} | {r['compile_s']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
