"""Does `--gpu-matmul 3xtf32` or `tf32` change what a compile produces? WikiText-2 perplexity of SmolLM2-135M
artifacts compiled with the calibration forwards' float32 products exact (fp32), as three TF32 products (3xtf32) and
as one (tf32: the operands cut to TF32, products exact in float32, as the tensor cores compute it), on the CPU.

The GPU computes a 3xtf32 product as a_hi b_hi + a_hi b_lo + a_lo b_hi on TF32 tensor cores, which read the lo
parts with their mantissas cut to TF32's 10 bits. This runs the same split on the CPU (dcc.ir.gpu_matmul with its
test switch `_cpu_too`) and cuts the lo parts the same way before the float32 products, so every product the GPU
makes exactly is made exactly here, and the accumulation is float32 in both; what differs is only the order of the
float32 additions (the GPU's kernels choose theirs). The point is the effect of 3xtf32's ~1e-6 relative error on the
searches' decisions and so on the artifact's accuracy, which needs a real model and no GPU; fp32 compiles with
another seed or one calibration window fewer give the size of a difference that means nothing.

    PYTHONPATH=. python bench/gpu_matmul_accuracy.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib ../shared/assets/ptb/ptb.valid.txt --eval ../shared/assets/wikitext2_raw_test/wiki.test.raw

JSON to bench/results/gpu_matmul_accuracy.json; a markdown table is printed."""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402  (bench/_results.py)
from _compiled import compiled  # noqa: E402  (bench/_compiled.py)

from dcc.api import CompileOptions  # noqa: E402
from dcc.compiler.calib_data import bos_token, load_tokenizer, tokenize_file, windows  # noqa: E402
from dcc.ir import gpu_matmul  # noqa: E402
from dcc.models.loader import LazyModel  # noqa: E402
from dcc.runtime.evaluate import perplexity  # noqa: E402
from dcc.runtime.reference import build_model  # noqa: E402


def mm3_tf32_inputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gpu_matmul.mm3 as TF32 tensor cores see it: the lo parts cut to TF32 too (hi parts already are)."""
    a_hi, b_hi = gpu_matmul.tf32_part(a.contiguous()), gpu_matmul.tf32_part(b.contiguous())
    a_lo, b_lo = gpu_matmul.tf32_part(a - a_hi), gpu_matmul.tf32_part(b - b_hi)
    cross = torch.mm(a_hi, b_lo)
    cross.add_(torch.mm(a_lo, b_hi))
    return torch.mm(a_hi, b_hi).add_(cross)


# variant -> (products, seed, calibration windows). The last two are references for the noise: what another seed
# (the passes' sampled choices) or one calibration window fewer moves.
VARIANTS = {"fp32": ("fp32", 0, 16), "3xtf32": ("3xtf32", 0, 16), "tf32": ("tf32", 0, 16),
            "fp32-seed1": ("fp32", 1, 16), "fp32-15windows": ("fp32", 0, 15)}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--recipes", default="tinychat:awq,qserve:default",
                    help="TARGET:ALGO,... (default: the target's default algorithm; QServe's is QoQ)")
    ap.add_argument("--variants", default="fp32,3xtf32,fp32-seed1",
                    help=f"rows per recipe, of: {', '.join(VARIANTS)}")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="bench/results/gpu_matmul_accuracy.json")
    args = ap.parse_args()

    tok = load_tokenizer(LazyModel(args.model).path)
    w = windows(tokenize_file(args.eval, tok), args.windows, args.seq_len, args.eval, bos=bos_token(tok))
    gpu_matmul.mm3 = mm3_tf32_inputs   # what the dispatch mode calls
    rows = []
    for recipe in args.recipes.split(","):
        target, algo = recipe.split(":")
        for variant in args.variants.split(","):
            mode, seed, chunks = VARIANTS[variant]
            gpu_matmul._cpu_too = mode != "fp32"
            # SmolLM2's 576-wide layers take TinyChat's g64 (its g128 kernels need K % 128)
            opts = CompileOptions(target=target, algo=None if algo == "default" else algo, calib=args.calib,
                                  group_size=64 if target == "tinychat" else None, calib_chunks=chunks,
                                  calib_seq_len=256, gpu_matmul=mode, seed=seed, progress=False, force=True)
            with compiled(args.model, opts) as (out, art, secs):
                ppl = perplexity(build_model(art), w, progress=False)["ppl"]
                rows.append({"target": target, "algo": algo, "variant": variant, "gpu_matmul": mode, "seed": seed,
                             "calib_chunks": chunks, "ppl": ppl, "compile_s": secs, "weights_sha256_16": digest(out)})
            gpu_matmul._cpu_too = False
            print(f"{target} {algo} {variant}: {ppl:.4f} ({secs:.0f} s)", flush=True)
    print(f"\n| target | algo | variant | WikiText-2 ppl ({args.windows} x {args.seq_len}) | weights digest |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['algo']} | {r['variant']} | {r['ppl']:.4f} | {r['weights_sha256_16']} |")
    path = _results.write("gpu_matmul_accuracy", rows, out=args.out, args=vars(args))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
