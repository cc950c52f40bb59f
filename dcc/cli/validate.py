"""`dcc validate`: decoded weights against the compiled ones, the drift from the float model (on real text or, as a
fallback, random token ids), and thresholds that make it a CI gate (exit 0 pass, 1 a check failed, 2 bad input;
JSON and JUnit XML)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .main import _fail, friendly, main

# passes after which a linear computes a rotated / rescaled / permuted version of the float layer's output
BASIS_CHANGING = {"rotate", "smooth", "smooth_attention", "reorder", "awq"}
WORST = 10   # layers the summary lists (--layers: all)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--model", type=click.Path(), default=None,
              help="The source model: also report per-layer output error and the drift of the model's output "
                   "against it (logits of a causal LM; last hidden states and mean-pooled embeddings of an encoder; "
                   "a diffusion model's denoiser output and each block's output, on --inputs).")
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Causal LMs, with --model: compare on this real text (tokenized by the artifact's tokenizer, cut "
                   "into --windows windows of --tokens tokens): KL, top-1 agreement and both perplexities. Without "
                   "it, seeded random token ids are used, and labelled so.")
@click.option("--tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Causal LMs and encoders: tokens per window / sequence for the output comparison (at most the "
                   "positions an encoder has).")
@click.option("--windows", "n_windows", type=click.IntRange(min=1), default=None,
              help="Windows of --text to compare on (default 4); sequences of random token ids without --text "
                   "(default 2).")
@click.option("--inputs", "inputs_file", type=click.Path(), default=None,
              help="Diffusion models: what the outputs are compared on -- a calibration file of `dcc calib record` "
                   "(recorded forward inputs), or a prompts file when --model is the pipeline folder.")
@click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True,
              help="Diffusion models: compare on the first N samples of --inputs.")
@click.option("--max-layer-error", type=click.FloatRange(min=0), default=None,
              help="Check: every quantized layer's output relative error against the float layer is at most X "
                   "(needs --model; one check per layer).")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help="Check: KL(float || artifact) of the next-token distributions, mean per token, at most X nats "
                   "(causal LMs, needs --model).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Check: the artifact's top-1 token agrees with the float model's on at least this fraction "
                   "(0-1) of the tokens (causal LMs, needs --model).")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0), default=None,
              help="Check: the artifact's perplexity on --text is at most (1 + X) times the float model's "
                   "(0.05 = 5 %; needs --model and --text).")
@click.option("--checks", "checks_file", type=click.Path(), default=None,
              help="A TOML file whose [checks] table sets the thresholds (max_layer_error, max_kl, min_top1, "
                   "max_ppl_increase); flags on the command line win.")
@click.option("--layers", "all_layers", is_flag=True,
              help="List every layer's output error (default: a summary and the 10 worst).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random token ids (without --text).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu: decode and run in torch; cuda: run every quantized layer through dcc's kernels (the CUDA "
                   "runtime of the artifact's target).")
@click.option("--json", "as_json", type=click.Path(), default=None,
              help="Also write the report as JSON here (measurements, inputs, checks, passed).")
@click.option("--junit", type=click.Path(), default=None,
              help="Also write the checks as JUnit XML here (one testcase per check), for CI systems.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly
def validate(artifact, model, text_file, tokens, n_windows, inputs_file, samples, max_layer_error, max_kl, min_top1,
             max_ppl_increase, checks_file, all_layers, seed, device, as_json, junit, quiet):
    """Decode ARTIFACT on the CPU; prove every quantized layer equals the compiled fake-quant weight bit for bit;
    with --model, report each layer's output error and the output drift against the float model (logits of a causal
    LM on --text or random token ids, hidden states and embeddings of an encoder, the denoiser's and each block's
    output of a diffusion model).

    \b
    As a CI gate: exit 0 when every check passes, 1 when one fails (each failure one line, measured vs allowed),
    2 on bad input. Checks: the decoded weights (always), and each threshold given by flag or --checks FILE.
    """
    from ..models.adapter import artifact_adapter
    from ..runtime.artifact import load_artifact
    from ..runtime.checks import checks_json, write_junit
    from ..runtime.gate import Thresholds, build_checks, check_inputs, read_checks_file
    from ..runtime.validate import check_exact
    from .commands import _check_device
    t0 = time.perf_counter()
    th = (read_checks_file(checks_file) if checks_file else Thresholds()).merged(
        max_layer_error=max_layer_error, max_kl=max_kl, min_top1=min_top1, max_ppl_increase=max_ppl_increase)
    for path, flag in ((as_json, "--json"), (junit, "--junit")):
        if path and not Path(path).resolve().parent.is_dir():
            _fail(f"{flag} {path}: its folder does not exist")
    if text_file and not Path(text_file).is_file():
        _fail(f"--text {text_file}: no such file")
    _check_device(device)
    art = load_artifact(artifact)
    _check_device(device, art)
    adapter = artifact_adapter(art.manifest)
    check_inputs(th, adapter.kind, model, text_file)
    if device.startswith("cuda"):
        from ..runtime.cuda.model import check_exact_cuda
        kernels = {}
        exact = check_exact_cuda(art, kernels=kernels)
    else:
        kernels, exact = {}, check_exact(art, progress=not quiet)
    bad = [k for k, ok in exact.items() if not ok]
    report = {"exact": exact, "inputs": None}
    click.echo(f"decoded weights equal the fake-quant weights: {len(exact) - len(bad)}/{len(exact)} layers")
    if kernels:   # where the target measures it: each layer's GPU kernel output against the CPU reference layer
        report["kernels"] = kernels
        worst = min(v["bit_equal"] for v in kernels.values())
        click.echo(f"GPU kernels vs CPU reference: {sum(v['ok'] for v in kernels.values())}/{len(kernels)} "
                   f"layers agree; outputs bit-equal >= {worst * 100:.2f}% per layer, max "
                   f"{max(v['max_ulp'] for v in kernels.values())} fp16 ulp")
    loader_checks = _engine_loader(art, report)
    cmp = None
    if model:
        cmp, report["inputs"] = _compare(art, adapter, model, text_file, tokens, n_windows, inputs_file, samples,
                                         seed, device, quiet)
        report["float"] = cmp
        _print_comparison(art, adapter, cmp, report["inputs"], th, all_layers)
    checks = build_checks(th, exact, cmp, set(art.quantized_layers())) + loader_checks
    failed = [c for c in checks if not c.passed]
    report["checks"], report["passed"] = checks_json(checks), not failed
    if as_json:
        Path(as_json).write_text(json.dumps(report, indent=1) + "\n")
    if junit:
        from ..runtime.text_metrics import describe_inputs
        props = {"artifact": str(art.path), "target": art.manifest["target"],
                 "inputs": describe_inputs(report["inputs"]) if report["inputs"] else "none (no --model given)"}
        write_junit(junit, "dcc validate", checks, time.perf_counter() - t0, props)
    # printed after the files are written: a reader of stdout that goes away must not cost the CI its report
    click.echo(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    for c in failed:
        click.echo(c.line())
    if bad:
        _fail(f"{len(bad)} layers decode to weights that differ from the compiled ones, first: {bad[0]}", 1)
    if failed:
        _fail(f"{len(failed)} of {len(checks)} checks failed, first: {failed[0].name}", 1)


def _engine_loader(art, report) -> list:
    """The target's check of its engine's loader (where it has one): a line, and a failing check when the manifest
    says that engine loads the artifact but it would not."""
    from ..runtime.checks import Check
    from .commands import _targets
    target = _targets()[art.manifest["target"]]
    problems = target.check_artifact(art)   # None: the target has no check of its engine's loader
    if problems is None:
        return []
    report["engine_loader"] = problems
    who = target.engine_name
    click.echo(f"{who}'s loader: every tensor it reads is present with its dtype and shape" if not problems
               else f"{who}'s loader would not take this artifact: {len(problems)} problems, first: {problems[0]}")
    if target.name not in art.manifest["engines"]:
        return []
    if problems:
        click.echo(f"the manifest says {who} loads it, but {problems[0]}")
    return [Check(f"{who}'s loader takes the artifact", len(problems), 0, unit="problems")]


def _compare(art, adapter, model, text_file, tokens, n_windows, inputs_file, samples, seed, device, quiet):
    """(the comparison with the float model, what it was compared on). A causal LM's or encoder's float model is
    streamed block by block; a diffusion model's is materialised whole (its blocks live in several lists)."""
    from ..models.loader import LazyModel
    from ..runtime.text_metrics import random_inputs, text_inputs
    from ..runtime.validate import check_same_model, compare_with_float
    lm = LazyModel(model)
    check_same_model(art, lm.config.to_dict(), model)
    qmodel = None
    if device.startswith("cuda"):
        from ..runtime.cuda.model import build_cuda_model
        qmodel = build_cuda_model(art, device)
    if adapter.kind == "diffusers":   # recorded inputs of its forward, not tokens; each block's output too
        from ..runtime.reference import check_rebuildable
        check_rebuildable(art)
        batch = adapter.validation_inputs(lm, inputs_file, samples)
        blocks = {"blocks": lm.block_prefixes} if qmodel is None else {}
        cmp = compare_with_float(art, lm.materialize_all(), batch, qmodel=qmodel, progress=not quiet, **blocks)
        return cmp, {"source": "recorded inputs", "file": str(inputs_file), "samples": samples}
    limit = adapter.max_tokens(art.config)
    if limit and tokens > limit:
        click.echo(f"note: --tokens {tokens} is beyond the model's {limit} positions; comparing on {limit}")
        tokens = limit
    if text_file:
        ids, inputs = text_inputs(art, adapter, text_file, tokens, n_windows or 4)
    else:
        ids, inputs = random_inputs(lm.config.vocab_size, n_windows or 2, tokens, seed)
    with lm.streamed() as fm:
        cmp = compare_with_float(art, fm, ids, qmodel=qmodel, text=bool(text_file), progress=not quiet)
    return cmp, inputs


def _print_comparison(art, adapter, cmp, inputs, th, all_layers) -> None:
    """What was compared on, the layers (a summary and the worst, or all with --layers), the blocks of a diffusion
    model, the model's output drift and the note on layers whose basis a pass changed."""
    from ..runtime.layer_names import natural_key
    from ..runtime.text_metrics import describe_inputs, describe_perplexity
    click.echo(describe_inputs(inputs))
    layers = cmp["layers"]
    if all_layers:
        click.echo(f"{'layer':44} {'output rel err':>14}")
        for k in sorted(layers, key=natural_key):
            click.echo(f"{k:44} {layers[k]:14.4e}")
    elif layers:
        errs = sorted(layers.values())
        quantized = set(art.quantized_layers())
        nq = sum(k in quantized for k in layers)
        above = sum(v > (th.max_layer_error or 0) for k, v in layers.items() if k in quantized)
        over = ("" if th.max_layer_error is None else
                f"; {above} quantized above --max-layer-error {th.max_layer_error:g}")
        click.echo(f"layer output error vs the float model: {len(layers)} layers ({nq} quantized), median "
                   f"{errs[len(errs) // 2]:.3e}, max {errs[-1]:.3e}{over}; the {min(WORST, len(errs))} worst "
                   f"(--layers lists all):")
        for k in sorted(layers, key=lambda k: -layers[k])[:WORST]:
            click.echo(f"  {k:42} {layers[k]:14.4e}")
    if cmp.get("blocks"):   # a diffusion model's blocks, in the order its forward calls them
        click.echo(f"{'block':44} {'output rel err':>14}")
        for k, v in cmp["blocks"].items():
            click.echo(f"{k:44} {v:14.4e}")
    moved = sorted({s["pass"] for s in art.manifest["recipe"]["pipeline"]} & BASIS_CHANGING)
    if moved:
        click.echo(f"note: {', '.join(moved)} changed the layers' bases on purpose (function-preserving), so a "
                   f"layer's output is not comparable to the float layer's; the {adapter.compares} are"
                   + ("; --max-layer-error checks the errors as measured" if th.max_layer_error is not None else ""))
    click.echo(adapter.describe_comparison(cmp))
    if "ppl_float" in cmp:
        click.echo(describe_perplexity(cmp))
