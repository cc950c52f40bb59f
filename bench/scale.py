"""Compile at scale (issue 28, point 1): `dcc compile --device cuda` on random Meta-Llama-3-8B and on a 4-block slice
of Meta-Llama-3-70B (real configs, bf16 sharded safetensors, a real tokenizer), for QServe (QoQ W4A8KV4 per channel with
GPTQ) and TinyChat (AWQ W4A16 g128), at 16 x 256 and 128 x 2048 calibration tokens; beside it llm-compressor's
GPTQ W4A16 and AWQ on the same model, windows and GPU when it can be imported. Per row: wall time, per-block time,
the projection to the real depth (80 blocks for the 70B slice), torch's and nvidia-smi's GPU peak and the host
peak RSS, each command in its own process. Rows merge into the JSON by id, so a run can be split over commands.
The peer comes from --peer-wheels (.whl312: llm-compressor 0.14.0.1, compressed-tensors 0.19.0 and the pure-Python
packages they import that a torch + transformers image lacks, from `pip download --no-deps`), unzipped at start.

    PYTHONPATH=. python bench/scale.py --rows '8b/dcc-*/16x256'      # one command of at most ~10 minutes
    PYTHONPATH=. python bench/scale.py --rows '8b/*/128x2048' --row-seconds 'dcc-qserve*=150,*=90'
                                                                     # each row cut at its limit, projected from its blocks
    PYTHONPATH=. python bench/scale.py --list                        # the row ids
    PYTHONPATH=. python bench/scale.py --quick                       # tiny model on the CPU, about a minute
    python bench/scale.py --merge a.json b.json                      # commands' results into bench/results/
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import _results  # bench/_results.py: the results' JSON format
import _scale_report as report
from _scale_models import MODELS, build, calibration
from _scale_run import run

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# what each row runs: dcc's command-line flags, or the peer's method (bench/_scale_peer.py)
METHODS = {
    "dcc-qserve": ("dcc", ["--target", "qserve"], "QoQ W4A8KV4, per-channel weights, GPTQ (qserve's default algo qoq)"),
    "dcc-tinychat-awq": ("dcc", ["--target", "tinychat", "--algo", "awq"], "AWQ W4A16 asymmetric g128 (TinyChat)"),
    # the recipe closest to llm-compressor's GPTQ W4A16 (dcc's GPTQ: act-order, static asymmetric groups of 128)
    "dcc-tinychat-gptq": ("dcc", ["--target", "tinychat", "--algo", "gptq"], "GPTQ W4A16 asymmetric g128 (TinyChat)"),
    # the same with the forward runs' float32 products as three TF32 products (--gpu-matmul, ir/gpu_matmul.py)
    "dcc-qserve-3xtf32": ("dcc", ["--target", "qserve", "--gpu-matmul", "3xtf32"],
                          "as dcc-qserve, --gpu-matmul 3xtf32"),
    "dcc-tinychat-awq-3xtf32": ("dcc", ["--target", "tinychat", "--algo", "awq", "--gpu-matmul", "3xtf32"],
                                "as dcc-tinychat-awq, --gpu-matmul 3xtf32"),
    # one TF32 product each (--gpu-matmul tf32): a third of 3xtf32's tensor work; llm-compressor calibrates in bf16
    "dcc-qserve-tf32": ("dcc", ["--target", "qserve", "--gpu-matmul", "tf32"], "as dcc-qserve, --gpu-matmul tf32"),
    "dcc-tinychat-awq-tf32": ("dcc", ["--target", "tinychat", "--algo", "awq", "--gpu-matmul", "tf32"],
                              "as dcc-tinychat-awq, --gpu-matmul tf32"),
    # the recipe closest to llm-compressor's AWQModifier, which searches the scales and then rounds each group's
    # min-max range (no clip search): dcc's awq pass, then rtn (a recipe file, RECIPES)
    "dcc-tinychat-awq-noclip": ("dcc", ["--target", "tinychat"], "AWQ scales, then round to nearest, no clip search "
                                                                 "(W4A16 asymmetric g128, TinyChat)"),
    "llmc-gptq": ("llmc", ["gptq"], "llm-compressor GPTQModifier scheme W4A16 (symmetric g128), lm_head ignored"),
    "llmc-awq": ("llmc", ["awq"], "llm-compressor AWQModifier + QuantizationModifier W4A16_ASYM (g128), lm_head "
                                  "ignored"),
}
# rows whose pass list is a recipe file (written into the row's folder and passed as --recipe)
RECIPES = {"dcc-tinychat-awq-noclip": "passes: [{pass: awq}, {pass: rtn}]\n"}
PEER_CODE = {
    "llmc-gptq": "oneshot(model, dataset, recipe=[GPTQModifier(targets='Linear', scheme='W4A16', "
                 "ignore=['lm_head'])], max_seq_length=L, num_calibration_samples=N, "
                 "shuffle_calibration_samples=False)",
    "llmc-awq": "oneshot(model, dataset, recipe=[AWQModifier(), QuantizationModifier(targets='Linear', "
                "scheme='W4A16_ASYM', ignore=['lm_head'])], max_seq_length=L, num_calibration_samples=N, "
                "shuffle_calibration_samples=False)",
}


def all_rows(models: list[str], shapes: list[tuple[int, int]]) -> list[dict]:
    """Per model, the small shape first, then each larger one; dcc before the peer."""
    rows = []
    for m in models:
        for n, L in shapes:
            for method, (tool, _, _) in METHODS.items():
                rows.append({"id": f"{m}/{method}/{n}x{L}", "model": m, "method": method, "tool": tool,
                             "chunks": n, "seq_len": L, "blocks": MODELS[m].layers})
    return rows


def select(rows: list[dict], patterns: str | None) -> list[dict]:
    if not patterns:
        return rows
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in rows if any(fnmatch.fnmatchcase(r["id"], p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--rows {patterns}: matches none of {', '.join(r['id'] for r in rows)}")
    return chosen


def find_assets(given: str | None) -> Path:
    """The shared assets (tokenizer, text): --assets, $ASSETS, the checkout's devshared/assets (the copy that
    travels to the GPU machine) or ../shared/assets."""
    for c in ([given] if given else []) + [os.environ.get("ASSETS"), ROOT / "devshared" / "assets",
                                           ROOT.parent / "shared" / "assets"]:
        if c and (Path(c) / "smollm2_tokenizer" / "tokenizer.json").is_file():
            return Path(c)
    raise SystemExit("no assets folder with smollm2_tokenizer/ (give --assets DIR)")


def unpack_wheels(folder: Path | None, into: Path) -> tuple[list[str], list[str]]:
    """Unzip every wheel of `folder` that this interpreter can load into `into` (a wheel is a zip of its
    site-packages files); returns (unpacked, skipped with why)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    if folder is None or not folder.is_dir():
        return [], []
    ok_tags = set(sys_tags())
    done, skipped = [], []
    for whl in sorted(folder.glob("*.whl")):
        tags = parse_wheel_filename(whl.name)[3]
        if not tags & ok_tags:
            skipped.append(f"{whl.name} (not for this Python)")
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(into)
        done.append(whl.name)
    return done, skipped


def child_env(extra_path: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                    else []))
    return env


def dcc_recipe(art: Path) -> dict | None:
    """The artifact manifest's recipe section (target, options, pipeline with each pass's config)."""
    try:
        return json.loads((art / "dcc.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated globs over row ids (see --list); default: all")
    ap.add_argument("--list", action="store_true", help="print the row ids and exit")
    ap.add_argument("--models", default=None, help="default 8b,70b4 (tiny with --quick)")
    ap.add_argument("--shapes", default=None, help="CHUNKSxSEQ_LEN,... (default 16x256,128x2048; 4x64 with --quick)")
    ap.add_argument("--quick", action="store_true", help="the tiny model, 4 x 64 tokens, on the CPU unless --device")
    ap.add_argument("--device", default=None, help="cuda (default); cpu only with --quick")
    ap.add_argument("--dir", default="/tmp/dcc-scale", help="models, calibration and artifacts (~30 GB for both)")
    ap.add_argument("--assets", default=None, help="folder with smollm2_tokenizer/, wikitext2_raw_test/, ptb/")
    ap.add_argument("--peer-wheels", default=str(ROOT / ".whl312"),
                    help="wheels of llm-compressor and its pure-Python needs, unpacked onto the peer's PYTHONPATH")
    ap.add_argument("--peer-path", default=None, help="a folder where llmcompressor is importable from (PYTHONPATH)")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole command: a row is started only with 30 s left, and stopped at the end")
    ap.add_argument("--row-seconds", default=None,
                    help="a time limit per row: S, or GLOB=S,... over row ids (first match wins); a row stopped at its "
                         "limit is projected from the blocks it finished (a lower bound, marked as such)")
    ap.add_argument("--rope-scaling", action="store_true",
                    help="Llama-3.1's llama3 RoPE scaling in the configs (dcc's targets refuse it: plain RoPE engines)")
    ap.add_argument("--keep-artifacts", action="store_true")
    ap.add_argument("--copy-to", default=None, help="also copy the JSON and the markdown table into this folder")
    ap.add_argument("--out", default=None,
                    help="default bench/results/scale.json (rows merge by id); with --quick DIR/scale_quick.json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge the rows of these result files (later ones win) into --out")
    args = ap.parse_args()
    if args.merge:
        return merge_files(args.merge, Path(args.out or BENCH / "results" / "scale.json"))
    t_start = time.perf_counter()
    models = (args.models or ("tiny" if args.quick else "8b,70b4")).split(",")
    shapes = [tuple(map(int, s.lower().split("x"))) for s in (args.shapes or ("4x64" if args.quick
                                                                             else "16x256,128x2048")).split(",")]
    device = args.device or ("cpu" if args.quick else "cuda")
    if device == "cpu" and not args.quick:
        raise SystemExit("--device cpu: only with --quick (the full rows are GPU measurements)")
    rows = select(all_rows(models, shapes), args.rows)
    if args.list:
        print("\n".join(r["id"] for r in rows))
        return
    assets, work = find_assets(args.assets), Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    args.out = args.out or str(work / "scale_quick.json" if args.quick else BENCH / "results" / "scale.json")
    state = {"built": {}, "results": [], "skipped": [], "recipes": {}, "peer": {}, "calibration": {}}

    # models are built in another process, and the machine's description is read there: this process never
    # creates a CUDA context, which would sit in the GPU memory that nvidia-smi reports for the children
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        machine = ex.submit(_results.machine).result()
        for m in dict.fromkeys(r["model"] for r in rows):
            state["built"][m] = b = ex.submit(build, MODELS[m], work / m, assets / "smollm2_tokenizer", device,
                                              args.rope_scaling).result()
            how = "cached" if b["cached"] else f"built in {b['seconds']} s"
            print(f"model {m}: {MODELS[m].name}, {b['bytes'] / 2**30:.1f} GiB ({how})", flush=True)
    _results.machine = lambda: machine
    state["machine"] = machine
    used_shapes = sorted({(r["chunks"], r["seq_len"]) for r in rows})
    calib, state["calibration"], ids = calibration(assets, work / rows[0]["model"], work, used_shapes)

    site = Path(tempfile.mkdtemp(prefix="scale-peer-"))
    try:
        peer_paths = []
        if any(r["tool"] == "llmc" for r in rows):
            done, skipped = unpack_wheels(Path(args.peer_wheels) if args.peer_wheels else None, site)
            peer_paths = ([args.peer_path] if args.peer_path else []) + ([str(site)] if done else [])
            state["peer"] = {"wheels": done, "wheels_skipped": skipped, "peer_path": args.peer_path}
        for r in rows:
            left = args.budget - (time.perf_counter() - t_start)
            if left < 30:
                state["skipped"].append({**r, "status": f"not run: the budget of {args.budget:.0f} s was spent"})
                print(f"{r['id']}: not run (budget)", flush=True)
                continue
            cap = row_limit(args.row_seconds, r["id"])
            run_row(r, args, state, work, calib, ids, peer_paths, device, timeout=min(left - 5, cap))
            save(args, state, device, t_start, work)   # after every row: a command cut short keeps what it measured
    finally:
        shutil.rmtree(site, ignore_errors=True)
    merged = save(args, state, device, t_start, work)
    print("\n" + report.table(merged))
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


def row_limit(spec: str | None, row_id: str) -> float:
    """--row-seconds: S for every row, or GLOB=S,... (the first glob that matches the row id or its method, the
    id's middle part); inf without one."""
    if not spec:
        return float("inf")
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        glob, _, secs = part.rpartition("=")
        # a glob names the row id or its method ('dcc-qserve*' matches 8b/dcc-qserve/128x2048)
        if not glob or fnmatch.fnmatchcase(row_id, glob) or fnmatch.fnmatchcase(row_id.split("/")[1], glob):
            return float(secs)
    return float("inf")


def run_row(r: dict, args, state: dict, work: Path, calib: Path, ids: dict, peer_paths: list[str], device: str,
            timeout: float) -> None:
    """Run one row in its own process and add its summary (and the recipe it ran) to `state`."""
    tool, flags, _ = METHODS[r["method"]]
    # a folder per row: an interrupted dcc compile leaves .NAME.partial beside its output (for --resume)
    row_dir = work / "artifacts" / r["id"].replace("/", "_")
    shutil.rmtree(row_dir, ignore_errors=True)
    row_dir.mkdir(parents=True)
    art = row_dir / "out"
    model_dir = work / r["model"]
    if r["method"] in RECIPES:
        (row_dir / "recipe.yaml").write_text(RECIPES[r["method"]])
        flags = [*flags, "--recipe", str(row_dir / "recipe.yaml")]
    if tool == "dcc":
        cmd = [sys.executable, str(BENCH / "_scale_child.py"), "compile", str(model_dir), "-o", str(art), *flags,
               "--calib", str(calib), "--calib-chunks", str(r["chunks"]), "--calib-seq-len", str(r["seq_len"]),
               "--device", device, "-q"]
        env = child_env([])
    else:
        cmd = [sys.executable, str(BENCH / "_scale_peer.py"), "--model", str(model_dir), "--ids",
               str(ids[(r["chunks"], r["seq_len"])]), "--method", flags[0], "--out", str(art)]
        env = child_env(peer_paths)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"{r['id']}: running (at most {timeout:.0f} s) ...", flush=True)
    res = run(cmd, env, timeout=timeout, log=work / "logs" / (r["id"].replace("/", "_") + ".log"),
              gpu=device != "cpu")
    row = report.summarise(r, res, MODELS[r["model"]].full_layers)
    row["command"] = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
    row["machine"] = state["machine"]   # rows of several commands (--merge) keep where each was measured
    state["results"].append(row)
    if tool == "dcc":
        rec = dcc_recipe(art)
        if rec is not None:
            state["recipes"][r["method"]] = {"flags": " ".join(flags).replace(str(row_dir) + "/", ""), "recipe": rec}
    else:
        ev = next((e for e in res["events"] if e.get("event") == "import"), None)
        if ev is not None:
            state["recipes"][r["method"]] = {"code": PEER_CODE[r["method"]], "llmcompressor": ev.get("llmcompressor"),
                                             "modifiers": ev.get("recipe")}
    if not args.keep_artifacts:
        shutil.rmtree(row_dir, ignore_errors=True)
    print(f"{r['id']}: {row['status']}, {row['wall_s']} s, {row['blocks_done']}/{row['blocks']} blocks"
          + (f", projected {row['projected_full_s']} s at {row['projected_blocks']} blocks"
             if "projected_full_s" in row else ""), flush=True)


def save(args, state: dict, device: str, t_start: float, work: Path) -> list[dict]:
    """Merge this run's rows into --out (rows of other commands stay) and write it, and with --copy-to copy it there
    with the table and the end of each row's log; returns the merged rows."""
    out = Path(args.out)
    merged, extra = report.merge(out, state["results"], state["skipped"])
    models = {**extra.get("models", {}), **{m: {"name": MODELS[m].name, "full_blocks": MODELS[m].full_layers,
                                                "config": MODELS[m].config(args.rope_scaling), **b}
                                            for m, b in state["built"].items()}}
    recipes = {**extra.get("recipes", {}), **state["recipes"]}
    for k, (_, _, what) in METHODS.items():
        recipes.setdefault(k, {})["what"] = what
    _results.write("scale", merged, out=out, models=models, calibration=state["calibration"], recipes=recipes,
                   peer={**extra.get("peer", {}), **state["peer"]}, device=device, versions=versions(),
                   seconds=round(time.perf_counter() - t_start, 1))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, dest / out.name)
        (dest / f"{out.stem}.md").write_text(report.table(merged) + "\n")
        logs = []
        for r in state["results"]:
            f = work / "logs" / (r["id"].replace("/", "_") + ".log")
            if f.is_file():
                logs += [f"==> {r['id']} <==", *f.read_text(errors="replace").splitlines()[-120:], ""]
        (dest / f"{out.stem}_logs.txt").write_text("\n".join(logs))
    return merged


def merge_files(files: list[str], out: Path) -> None:
    """Rows of several commands' JSON (each brought back from the GPU machine) into one file: rows by id, the
    models, recipes and peer sections joined, the header (commit, machine, date, command) of the last file."""
    for f in files:
        doc = json.loads(Path(f).read_text())
        rows, extra = report.merge(out, doc.get("rows", []), [])
        joined = {k: ({**extra[k], **v} if isinstance(v, dict) and isinstance(extra.get(k), dict) else v)
                  for k, v in doc.items() if k != "rows"}
        out.parent.mkdir(parents=True, exist_ok=True)
        head = {k: joined[k] for k in ("commit", "machine", "date", "command") if k in joined}
        out.write_text(json.dumps({**head, **extra, **joined, "rows": rows}, indent=1) + "\n")
    print(report.table(json.loads(out.read_text())["rows"]))
    print(f"\nwrote {out}")


def versions() -> dict:
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
