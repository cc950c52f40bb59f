"""Artifact fingerprints: compile a fixed set of (model, target, recipe) configurations through the `dcc` command and
print the sha256 of each artifact's tensors, config.json and dcc.json, so that a refactoring can show its artifacts
are byte-identical before and after (run it on both commits, on the same machine, and compare the columns).

    python bench/artifact_hashes.py --json before.json               # on the old commit
    python bench/artifact_hashes.py --json after.json --compare before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ASSETS", ROOT.parent / "shared" / "assets"))
STORIES = ASSETS / "stories260K" / "hf"
SMOLLM2 = Path(os.environ.get("DCC_SMOLLM2_GGUF", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
PTB = ASSETS / "ptb" / "ptb.valid.txt"

# (name, model, extra arguments); stories260K's 172-wide down_proj and SmolLM2's 576-wide layers take no group of 128
# (nor stories' 64-wide layers), so those configurations keep the layers the layout cannot take in 16 bits
CONFIGS = [
    ("stories tinychat rtn g64", "stories", ["--target", "tinychat", "--algo", "rtn", "--group-size", "64"]),
    ("stories tinychat awq g64", "stories", ["--target", "tinychat", "--algo", "awq", "--group-size", "64"]),
    ("stories tinychat gptq g64", "stories", ["--target", "tinychat", "--algo", "gptq", "--group-size", "64"]),
    ("stories qserve qoq pc", "stories", ["--target", "qserve", "--algo", "qoq"]),
    ("stories qserve qoq-rtn pc", "stories", ["--target", "qserve", "--algo", "qoq-rtn"]),
    ("stories qserve smoothquant w8a8", "stories", ["--target", "qserve", "--algo", "smoothquant", "--bits", "8"]),
    ("smollm2 tinychat rtn g64", "smollm2", ["--target", "tinychat", "--algo", "rtn", "--group-size", "64"]),
    ("smollm2 tinychat awq g64", "smollm2", ["--target", "tinychat", "--algo", "awq", "--group-size", "64"]),
    ("smollm2 tinychat gptq g64", "smollm2", ["--target", "tinychat", "--algo", "gptq", "--group-size", "64"]),
    ("smollm2 tinychat awq g128", "smollm2", ["--target", "tinychat", "--algo", "awq", "--group-size", "128"]),
    ("smollm2 qserve qoq pc", "smollm2", ["--target", "qserve", "--algo", "qoq"]),
    ("smollm2 qserve qoq g128", "smollm2", ["--target", "qserve", "--algo", "qoq", "--group-size", "128"]),
    ("smollm2 qserve qoq-rtn pc", "smollm2", ["--target", "qserve", "--algo", "qoq-rtn"]),
    ("smollm2 qserve smoothquant w8a8", "smollm2", ["--target", "qserve", "--algo", "smoothquant", "--bits", "8"]),
]


def stories_calib(path: Path) -> None:
    """stories260K ships no tokenizer: calibrate on token ids the float model samples itself (seeded)."""
    import torch
    from dcc.models.loader import LazyModel
    model = LazyModel(STORIES).materialize_all()
    torch.manual_seed(0)
    seqs = model.generate(torch.ones(4, 1, dtype=torch.long), do_sample=True, max_new_tokens=127,
                          min_new_tokens=127, pad_token_id=0)
    path.write_text(" ".join(map(str, seqs.flatten().tolist())))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(art: Path) -> dict:
    tensors = hashlib.sha256()
    for f in sorted(art.glob("*.safetensors")):
        tensors.update(f.name.encode() + bytes.fromhex(sha(f)))
    return {"tensors": tensors.hexdigest(), "config": sha(art / "config.json"), "manifest": sha(art / "dcc.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the fingerprints here")
    ap.add_argument("--compare", help="a JSON written by an earlier run: print both columns")
    ap.add_argument("--only", default="", help="comma-separated substrings of the configuration names to run")
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    old = json.loads(Path(args.compare).read_text()) if args.compare else {}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        calib = {"stories": d / "stories_ids.txt", "smollm2": PTB}
        stories_calib(calib["stories"])
        models = {"stories": STORIES, "smollm2": SMOLLM2}
        for name, model, extra in CONFIGS:
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            out = d / name.replace(" ", "_")
            cmd = [sys.executable, "-m", "dcc", "compile", str(models[model]), *extra, "--unsupported", "keep",
                   "--calib", str(calib[model]), "--calib-chunks", "4", "--calib-seq-len", "128", "-o", str(out), "-q"]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                results[name] = {"error": p.stderr.strip().splitlines()[-1]}
            else:
                results[name] = {**fingerprint(out), "seconds": round(time.perf_counter() - t, 1)}
            r, o = results[name], old.get(name, {})
            same = {k: (o.get(k) == r.get(k)) if o else None for k in ("tensors", "config", "manifest")}
            print(f"{name:34} tensors {r.get('tensors', r.get('error'))[:12]} config {str(r.get('config'))[:12]} "
                  f"manifest {str(r.get('manifest'))[:12]}"
                  + (f"  | before: tensors {'same' if same['tensors'] else 'DIFFERENT'}, config "
                     f"{'same' if same['config'] else 'DIFFERENT'}, manifest "
                     f"{'same' if same['manifest'] else 'DIFFERENT'}" if o else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
