"""Subcommands of `dcc`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from .main import _fail, friendly, main


def _targets():
    from ..targets.base import targets
    return targets()


def _targets_epilog() -> str:
    """--help's last section, from the target registry: each target, its algorithms and its options."""
    import inspect
    lines = ["\b", "Targets (--target):"]
    for name, t in _targets().items():
        lines.append(f"  {name}: {t.summary}")
        for algo, what in t.algos.items():
            lines.append(f"    --algo {algo}: {what}")
        doc = inspect.cleandoc(t.Options.__doc__ or "").split("\n\n")[0]
        lines += ["    " + x for x in doc.splitlines()]
    return "\n".join(lines)


@main.command("compile", epilog=_targets_epilog())
@click.argument("model", type=click.Path())
@click.option("--target", default=None,
              help=f"Engine layout to emit: {', '.join(_targets())} (default: the recipe's, else "
                   f"{next(iter(_targets()))}; see Targets below).")
@click.option("--algo", default=None,
              help="Algorithm (pass pipeline) of the target; default: the target's first (see Targets below).")
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Artifact folder to create.")
@click.option("--calib", type=click.Path(), required=True,
              help="Calibration text file (UTF-8; token ids separated by spaces for models without a tokenizer).")
@click.option("--calib-chunks", type=click.IntRange(min=1), default=None,
              help="Number of calibration windows (default: the recipe's, else 16).")
@click.option("--calib-seq-len", type=click.IntRange(min=1), default=None,
              help="Tokens per calibration window (default: the recipe's, else 256).")
@click.option("--recipe", type=click.Path(), default=None,
              help="A recipe (YAML/JSON: target, options, passes, seed, calibration) or an artifact's dcc.json, "
                   "which reproduces that artifact; options given on the command line win. A pass list alone "
                   "replaces --algo, e.g. 'passes: [{pass: awq}, {pass: clip, config: {grid: 20}}, {pass: rtn}]' "
                   "(see `dcc passes`).")
@click.option("--bits", type=int, default=None,
              help="Weight bits; which a target takes is listed under Targets (default: the target's, 4).")
@click.option("--group-size", type=int, default=None,
              help="Input features per scale; 0 = per channel where the target has it (default: the target's).")
@click.option("--kv-bits", type=click.Choice(["auto", "4", "8", "16"]), default=None,
              help="KV cache precision, for targets that simulate a quantized cache (per token and head, after RoPE).")
@click.option("--rank", type=click.IntRange(min=16), default=None,
              help="Rank of the 16-bit low-rank branch, for targets with one (SVDQuant; a multiple of 16, default 32).")
@click.option("--precision", type=click.Choice(["int4", "nvfp4"]), default=None,
              help="4-bit format of weights and activations, for W4A4 targets: int4 (groups of 64, default) or nvfp4 "
                   "(e2m1 with e4m3 scales per 16).")
@click.option("--zero", type=click.Choice(["auto", "float", "integer"]), default=None,
              help="Zero points, for targets with asymmetric groups: float (each group's 16-bit offset is free), "
                   "integer (AWQ's integer zero point) or auto (integer for rtn, float for the searched methods).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default=None,
              help="Scales and unquantized tensors (default float16).")
@click.option("--unsupported", type=click.Choice(["error", "keep"]), default=None,
              help="Layers whose shape the layout cannot take: stop with an error (default), or keep them 16-bit.")
@click.option("--dump-dir", type=click.Path(), default=None,
              help="Write the IR after every pass (text + JSON per block) and an ONNX of the first block here.")
@click.option("--seed", type=int, default=None, help="Random seed (default: the recipe's, else 0).")
@click.option("--device", default="cpu", show_default=True, help="Where calibration runs (cpu, cuda).")
@click.option("--gpu-matmul", type=click.Choice(["fp32", "3xtf32", "tf32"]), default="fp32", show_default=True,
              help="Experimental: the float32 matrix products of calibration's forward runs on a GPU. 3xtf32 computes "
                   "each as three TF32 tensor-core products of split operands (relative error ~1e-6; an 8B AWQ block "
                   "took 5.6 s instead of 7.9 s on an H100); tf32 as one (~5e-4, a third of the tensor work; "
                   "llm-compressor calibrates in bf16, ~4e-3). The artifact then differs from an fp32 compile in low "
                   "bits; what that does to perplexity: bench/gpu_matmul_accuracy.py.")
@click.option("--gpus", type=int, default=None,
              help="Spread calibration over this many GPUs of this machine (1, 2, 4 or 8; NCCL): each process "
                   "holds a share of the calibration sequences, the statistics the passes read are reduced over all "
                   "of them, and process 0 writes the artifact, byte-identical to one process's on the same "
                   "hardware where the arithmetic is the same. Causal LMs and encoders. Also runs under torchrun.")
@click.option("--procs", type=int, default=None,
              help="As --gpus, with this many processes on the --device (cpu: the gloo backend, the machine's "
                   "cores shared among them). On the CPU it divides memory per process, not time: on 2 cores, 2 "
                   "processes took 1.3-1.4x one's time (bench/results/dist_cpu.json).")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is a dcc artifact (never another folder, the source model or the current "
                   "folder); the old artifact is swapped out only once the new one is complete. Also discards an "
                   "interrupted compile of OUTPUT (see --resume).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted compile of OUTPUT from its first unfinished block. Each finished block is "
                   "checkpointed in OUTPUT's temporary folder, kept beside it as .NAME.partial when the compile is "
                   "stopped (Ctrl-C, SIGTERM, out of memory or disk; also found after a kill -9); it is checked "
                   "against the model files, calibration, options and versions, and the artifact is byte-identical "
                   "to an uninterrupted compile's. Causal LMs and encoders (not diffusion models).")
@click.option("--no-checkpoint", is_flag=True,
              help="Do not checkpoint blocks: an interrupted compile leaves nothing to resume.")
@click.option("--debug", is_flag=True, help="Verify the IR between passes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Print what each pass does to each block.")
@friendly
def compile_cmd(model, target, algo, out, calib, calib_chunks, calib_seq_len, recipe, bits, group_size, kv_bits, rank,
                precision, zero, dtype, unsupported, dump_dir, seed, device, gpu_matmul, gpus, procs, force, resume,
                no_checkpoint, debug, quiet, verbose):
    """Compile MODEL (a Hugging Face folder or a .gguf file) into an engine-ready artifact folder.

    Blocks are captured with torch.export and compiled one at a time on the calibration data; the artifact is
    written to a temporary folder and renamed into place when complete. An interrupted compile keeps its finished
    blocks: the same command with --resume continues it (--force discards it)."""
    from ..api import CompileOptions, compile_model
    from ..compiler import dist
    from .main import install_logging
    if gpus is not None and procs is not None:
        raise click.UsageError("give --gpus or --procs, not both")
    if gpus is not None:
        device = "cuda"
    n = gpus if gpus is not None else procs
    if n is not None and n > 1 and int(os.environ.get("WORLD_SIZE") or 1) == 1:   # the launcher: start the processes
        from ..compiler.launch import check_procs, launch
        check_procs(n, device)
        if resume:
            raise ValueError("--resume: a compile spread over several processes keeps no checkpoints to resume "
                             "from; run it again without --resume")
        sys.exit(launch(_without_launch_flags(sys.argv[1:]) + ["--device", device], n, device))
    install_logging(verbose)   # target, algorithm and options are checked by the target registry: one line each
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:   # one process of a spread compile (ours, or torchrun's)
        dist.set_current(dist.init_from_env(device))
        if not dist.current().main:
            logging.getLogger("dcc").setLevel(logging.WARNING)
    opts = CompileOptions(target=target, algo=algo, recipe=recipe, bits=bits, group_size=group_size, zero=zero,
                          kv_bits=kv_bits, rank=rank, precision=precision, dtype=dtype, calib=calib, calib_chunks=calib_chunks, calib_seq_len=calib_seq_len,
                          unsupported=unsupported,
                          seed=seed, device=device, dump_dir=dump_dir, force=force, resume=resume,
                          checkpoint=not no_checkpoint, debug=debug, gpu_matmul=gpu_matmul,
                          progress=not quiet, verbose=verbose)
    try:
        compile_model(model, out, opts)
    finally:
        dist.shutdown()


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The command line a spread compile's processes run: this one less --gpus/--procs (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--gpus", "--procs"):
            skip = True
        elif not a.startswith(("--gpus=", "--procs=")):
            out.append(a)
    return out


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's layer table as JSON.")
@friendly
def inspect(artifact, as_json):
    """What is in ARTIFACT: target, engines, recipe, and per layer its format, size and error. Every file is
    checked against the manifest's checksums first."""
    from ..runtime.artifact import load_artifact
    from ..runtime.layer_names import natural_key
    art = load_artifact(artifact)
    m = art.manifest
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    size = sum((art.path / f).stat().st_size for f in m["files"])
    r = m["recipe"]
    click.echo(f"{art.path}: target {m['target']} (loads in: {', '.join(m['engines'])}), {size / 2**20:.1f} MiB")
    click.echo(f"source {m['source']['model']} ({m['source']['architecture']}, "
               f"{m['source'].get('kind', 'causal-lm')}, {m['source']['num_blocks']} blocks); "
               f"algo {r['algo']}; passes {' -> '.join(s['pass'] for s in r['pipeline'])}")
    c = r["calibration"]
    click.echo(f"calibration {c['file']} {c['chunks']}x{c['seq_len']} tokens, seed {r['seed']}; "
               f"dcc {m['versions']['dcc']}, torch {m['versions']['torch']}")
    rt = m.get("runtime") or {}
    if rt.get("activations") or rt.get("kv_bits"):
        click.echo(f"run time: activations {rt.get('activations') or '16-bit'}, KV cache "
                   f"{rt.get('kv_bits') or 16}-bit")
    click.echo(f"{'layer':44} {'shape':>11} {'format':28} {'SQNR dB':>8} {'out err':>9}")
    nq = 0
    for name, e in sorted(m["layers"].items(), key=lambda kv: natural_key(kv[0])):
        gs = e.get("spec", {}).get("group_size", 0)
        fmt = "16-bit (kept)" if "skip_reason" in e else e["format"] + (f" g{gs}" if gs > 0 else "")
        nq += "skip_reason" not in e
        sq = e.get("weight_sqnr_db")
        oe = e.get("output_rel_err")
        click.echo(f"{name:44} {'x'.join(map(str, e['shape'])):>11} {fmt:28} "
                   f"{sq if sq is not None else '-':>8} {oe if oe is not None else '-':>9}")
    click.echo(f"{nq} of {len(m['layers'])} linears quantized")


def _check_device(device: str, art=None) -> None:
    """cpu: the reference; cuda: dcc's kernels (built with nvcc on first use), the CUDA runtime the artifact's
    target names."""
    from ..runtime.device import check_device
    if check_device(device).type == "cuda" and art is not None:
        from ..runtime import cuda as rt
        ext = _targets()[art.manifest["target"]].cuda_extension
        if ext is None:
            _fail(f"{art.path}: target {art.manifest['target']} has no CUDA runtime; use --device cpu")
        ok, why = rt.available(ext)
        if not ok:
            _fail(why)


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--ppl", "ppl_file", type=click.Path(), default=None,
              help="Causal LMs: perplexity on this text (e.g. wiki.test.raw).")
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Encoders: cosine between the artifact's and the --baseline model's mean-pooled embeddings of "
                   "this file's lines (mean and min).")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per non-overlapping window (--ppl); the most tokens of a line (--text, at most the "
                   "model's positions).")
@click.option("--windows", "n_windows", default=None, type=click.IntRange(min=1),
              help="Evaluate only the first N windows (--ppl) or lines (--text). Without it --ppl runs every "
                   "window of the text, and says how many and about how long once one window is timed.")
@click.option("--baseline", type=click.Path(), default=None,
              help="The source model (float): also evaluated with --ppl; what the embeddings are compared with "
                   "(required) with --text.")
@click.option("--images", "prompts_file", type=click.Path(), default=None,
              help="Diffusion models: one image per line of this prompts file through --pipeline, with its 16-bit "
                   "denoiser and with the artifact's; PSNR and SSIM per image and their means.")
@click.option("--pipeline", "pipeline_dir", type=click.Path(), default=None,
              help="With --images: the local diffusers pipeline folder the artifact's model came from (offline).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="With --images: denoising steps (default: the pipeline's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="With --images: image i is generated with seed + i, in both runs.")
@click.option("--height", type=click.IntRange(min=1), default=None, help="With --images: pixels (default: the "
              "pipeline's).")
@click.option("--width", type=click.IntRange(min=1), default=None, help="With --images: pixels (default: the "
              "pipeline's).")
@click.option("--max-sequence-length", type=click.IntRange(min=1), default=None,
              help="With --images: prompt tokens, for pipelines that take it (FLUX; default: the pipeline's).")
@click.option("--out-html", type=click.Path(), default=None,
              help="With --images: write a page with the images side by side and their metrics here.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu (reference) or cuda (dcc's kernels for the artifact's target).")
@click.option("--json", "as_json", type=click.Path(), default=None, help="Also write the results as JSON here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly
def eval_cmd(artifact, ppl_file, text_file, seq_len, n_windows, baseline, prompts_file, pipeline_dir, steps, seed,
             height, width, max_sequence_length, out_html, device, as_json, quiet):
    """Evaluate ARTIFACT itself (decoded weights, CPU reference). A causal LM: perplexity (--ppl), GPTQ-style, the
    text tokenized once and cut into non-overlapping windows. An encoder: the cosine of its mean-pooled sentence
    embeddings to the float model's (--text FILE --baseline MODEL). A diffusion model: PSNR and SSIM of the images
    its pipeline makes with the artifact's denoiser against its own 16-bit one (--images PROMPTS --pipeline DIR)."""
    from ..runtime.artifact import load_artifact
    from ..runtime.evaluate import eval_adapter, eval_data
    from ..runtime.reference import build_model
    from ..runtime.validate import check_same_model
    if prompts_file or pipeline_dir:
        if ppl_file or text_file:
            _fail("--images evaluates a diffusion model; give it alone, without --ppl or --text")
        return _eval_images(artifact, prompts_file, pipeline_dir, steps, seed, height, width, max_sequence_length,
                            out_html, device, as_json, quiet)
    if bool(ppl_file) == bool(text_file):
        _fail(_diffusers_hint(artifact) or "give one of --ppl FILE (causal LMs: perplexity) or --text FILE "
              "(encoders: embedding cosine to --baseline MODEL)")
    _check_device(device)
    art = load_artifact(artifact)
    _check_device(device, art)
    adapter = eval_adapter(art, "--ppl" if ppl_file else "--text", baseline)
    baseline_lm = None
    if baseline:
        from ..models.loader import LazyModel
        baseline_lm = LazyModel(baseline)
        check_same_model(art, baseline_lm.config.to_dict(), baseline)
    data = eval_data(art, adapter, ppl_file or text_file, seq_len, n_windows,
                     baseline_lm.path if baseline_lm is not None else None)
    if device.startswith("cuda"):
        from ..runtime.cuda.model import build_cuda_model
        model = build_cuda_model(art)
    else:
        model = build_model(art)
    extra = {}
    if ppl_file and n_windows is None and data.shape[0] > 2:   # the whole text: say how long it will take
        extra["on_timed"] = lambda s: _say_estimate(data.shape, s, baseline_lm is not None)
    with contextlib.ExitStack() as stack:
        base = None
        if baseline_lm is not None:   # one block of the float model resident at a time (a diffusers model: whole)
            base = (baseline_lm.materialize_all() if baseline_lm.adapter.kind == "diffusers"
                    else stack.enter_context(baseline_lm.streamed()))
        results = adapter.evaluate(model, data, base, device=device, progress=not quiet, **extra)
    for line in adapter.report(results):
        click.echo(line)
    if as_json:
        Path(as_json).write_text(json.dumps(results, indent=1) + "\n")


def _say_estimate(shape, first_s: float, baseline: bool) -> None:
    """One line on stderr once a window has been timed: how many windows, and how long they take here."""
    import sys
    from tqdm.auto import tqdm
    runs = shape[0] * (2 if baseline else 1)
    total = runs * first_s
    what = f"{shape[0]} windows x {shape[1]} tokens" + (" (artifact and baseline)" if baseline else "")
    tqdm.write(f"perplexity: {what}, about {total / 60:.1f} min at {first_s:.2f} s/window on this machine "
               f"(--windows N for fewer)", file=sys.stderr)
    sys.stderr.flush()


def _diffusers_hint(artifact) -> str | None:
    """The line `dcc eval` without an evaluation gives when ARTIFACT is a diffusion model's (None otherwise: the
    general line, and any damage is reported by the loader as before)."""
    from ..runtime.artifact import ArtifactError, load_artifact
    try:
        m = load_artifact(artifact, verify=False).manifest
    except (ArtifactError, ValueError):
        return None
    src = m.get("source") or {}
    if src.get("kind") != "diffusers":
        return None
    return (f"{artifact}: a diffusion model ({src.get('architecture', '?')}) is evaluated by the images of its "
            f"pipeline: give --images PROMPTS --pipeline PIPELINE_DIR (PSNR and SSIM against the 16-bit model)")


def _eval_images(artifact, prompts_file, pipeline_dir, steps, seed, height, width, max_sequence_length, out_html,
                 device, as_json, quiet):
    """`dcc eval ARTIFACT --images PROMPTS --pipeline DIR`: dcc.runtime.images, reported by the diffusers adapter."""
    from ..models.diffusers_record import read_prompts
    from ..runtime.artifact import load_artifact
    from ..runtime.evaluate import eval_adapter
    from ..runtime.images import ImageSettings, compare_images, load_eval_pipeline
    if not (prompts_file and pipeline_dir):
        _fail("--images PROMPTS and --pipeline PIPELINE_DIR go together (the prompts, and the diffusers pipeline "
              "that turns them into images)")
    if out_html and not Path(out_html).resolve().parent.is_dir():
        _fail(f"--out-html {out_html}: its folder does not exist")
    _check_device(device)
    art = load_artifact(artifact)
    _check_device(device, art)
    adapter = eval_adapter(art, "--images", None)
    from ..runtime.reference import check_rebuildable
    check_rebuildable(art)
    prompts = read_prompts(prompts_file)
    pipe = load_eval_pipeline(pipeline_dir, art)
    if device.startswith("cuda"):
        from ..runtime.cuda.model import build_cuda_model

        def build(a):
            return build_cuda_model(a, device)
    else:
        from ..runtime.reference import build_model as build
    settings = ImageSettings(steps, seed, height, width, max_sequence_length)
    results, ref, got = compare_images(art, pipe, build, prompts, settings, device, progress=not quiet)
    for line in adapter.report(results):
        click.echo(line)
    if out_html:
        from ..runtime.html_report import write_report
        click.echo(f"wrote {write_report(out_html, results, ref, got, f'dcc eval --images: {art.path.name}')}")
    if as_json:
        Path(as_json).write_text(json.dumps(results, indent=1) + "\n")


@main.command()
@friendly
def passes():
    """The registered passes (recipe tokens), what each does and its options with defaults."""
    import dataclasses
    from ..passes import load_all
    from ..passes.base import REGISTRY
    load_all()
    for name in sorted(REGISTRY):
        p = REGISTRY[name]
        doc = " ".join((__import__(p.__module__, fromlist=["_"]).__doc__ or "").strip().split("\n\n")[0].split())
        click.echo(f"{name}: {doc}")
        for f in dataclasses.fields(p.Config):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            click.echo(f"    {f.name} = {default!r}")
