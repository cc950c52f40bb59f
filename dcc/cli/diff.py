"""`dcc diff A B`: two artifacts of one model compared (dcc/runtime/diff.py does the work): recipe and size
differences, per-layer SQNR and output-error deltas, which is better; with --max-layer-error-increase a CI gate
(exit 0 pass, 1 a layer got worse by more than allowed, 2 bad input; JSON and JUnit XML as `dcc validate`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .main import _fail, friendly, main

SHOWN = 10   # layers listed without --layers: the largest output-error increases


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.3f} MiB"


def _print_recipe(rows: list[dict]) -> None:
    if not rows:
        click.echo("recipe: identical")
        return
    click.echo(f"recipe: {len(rows)} differences (A -> B)")
    for r in rows:
        click.echo(f"  {r['key']}: {json.dumps(r['a'])} -> {json.dumps(r['b'])}")


def _print_sizes(sizes: dict) -> None:
    t = sizes["total"]
    pct = f" ({t['delta'] / t['a'] * 100:+.1f}%)" if t["a"] else ""
    click.echo(f"size: {_mib(t['a'])} -> {_mib(t['b'])}, {t['delta']:+d} bytes{pct}")
    for f, r in sizes["files"].items():
        if r["delta"] or r["a"] is None or r["b"] is None:
            click.echo(f"  {f}: {_fmt(r['a'], 'd')} -> {_fmt(r['b'], 'd')} bytes ({r['delta']:+d})")


def _print_layers(layers: dict, all_layers: bool) -> None:
    rows = layers["common"]
    click.echo(f"layers: {len(rows)} in both (deltas are B minus A)"
               + ("" if all_layers or len(rows) <= SHOWN else f"; the {SHOWN} largest output-error increases "
                  f"(--layers: all)"))
    shown = list(rows.items())
    if not all_layers and len(shown) > SHOWN:
        shown = sorted(shown, key=lambda kv: -(kv[1]["err_delta"] if kv[1]["err_delta"] is not None else -1e9))
        shown = shown[:SHOWN]
    click.echo(f"  {'layer':44} {'SQNR A':>7} {'SQNR B':>7} {'dSQNR':>7} {'err A':>9} {'err B':>9} {'d err':>10}")
    for name, r in shown:
        fmt = "" if r["format_a"] == r["format_b"] else f"  format {r['format_a']} -> {r['format_b']}"
        click.echo(f"  {name:44} {_fmt(r['sqnr_a'], '.2f'):>7} {_fmt(r['sqnr_b'], '.2f'):>7} "
                   f"{_fmt(r['sqnr_delta'], '+.2f'):>7} {_fmt(r['err_a'], '.4g'):>9} {_fmt(r['err_b'], '.4g'):>9} "
                   f"{_fmt(r['err_delta'], '+.3g'):>10}{fmt}")
    for side in ("a", "b"):
        only = layers[f"only_{side}"]
        if only:
            click.echo(f"only in {side.upper()} ({len(only)}): {', '.join(only)}")


def _print_summary(s: dict, ppl: dict | None, text_file) -> None:
    if s["layers_compared"]:
        ma, mb = s["mean_err_a"], s["mean_err_b"]
        click.echo(f"mean layer output_rel_err: A {ma:.4g}, B {mb:.4g} ({(mb - ma) / ma * 100 if ma else 0:+.1f}%); "
                   f"B worse on {s['worse_layers']}, better on {s['better_layers']} of {s['layers_compared']} layers")
    if s["mean_sqnr_a"] is not None:
        click.echo(f"mean weight SQNR: A {s['mean_sqnr_a']:.2f} dB, B {s['mean_sqnr_b']:.2f} dB")
    if ppl:
        src = f", source model {ppl['source']['ppl']:.4f}" if "source" in ppl else ""
        r = ppl["a"]
        click.echo(f"perplexity on {text_file} ({r['windows']} windows x {r['seq_len']} tokens): A "
                   f"{ppl['a']['ppl']:.4f}, B {ppl['b']['ppl']:.4f}{src}")
    if s["better"] is None:
        click.echo("better: cannot tell (no layer error in both manifests; give --text)")
    else:
        who = {"a": "A", "b": "B", "same": "neither (equal)"}[s["better"]]
        click.echo(f"better: {who} (on {s['basis']})")


@main.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Causal LMs: also measure both artifacts' perplexity on this text (as `dcc eval --ppl`); then "
                   "'better' is decided on it instead of the mean layer error.")
@click.option("--model", type=click.Path(), default=None,
              help="With --text: the source model; its tokenizer reads the text where the artifacts hold none, and "
                   "its float perplexity is shown beside theirs.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="With --text: tokens per non-overlapping window.")
@click.option("--windows", "n_windows", type=click.IntRange(min=1), default=None,
              help="With --text: evaluate only the first N windows.")
@click.option("--max-layer-error-increase", type=click.FloatRange(min=0), default=None,
              help="Check, one per layer quantized in both: B's output_rel_err (from its manifest) is at most "
                   "(1 + X) times A's -- X is relative, 0.1 = 10 % worse. Exit 1 when any layer exceeds it.")
@click.option("--layers", "all_layers", is_flag=True,
              help=f"List every common layer (default: the {SHOWN} largest output-error increases).")
@click.option("--json", "as_json", type=click.Path(), default=None,
              help="Also write the comparison as JSON here (recipe, sizes, layers, summary, checks, passed).")
@click.option("--junit", type=click.Path(), default=None,
              help="Also write the checks as JUnit XML here (one testcase per check), for CI systems.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly
def diff_cmd(a, b, text_file, model, seq_len, n_windows, max_layer_error_increase, all_layers, as_json, junit,
             quiet):
    """Compare artifact B with artifact A, both compiled from the same model (e.g. by two dcc versions, or with two
    recipes): recipe differences, sizes per file, each layer's weight SQNR and output error from the manifests
    (B minus A), and which is better overall.

    \b
    As a CI gate: exit 0 when every check passes (or none is given), 1 when a layer's output error grew by more
    than --max-layer-error-increase, 2 on bad input (artifacts of different models included)."""
    from ..runtime.artifact import load_artifact
    from ..runtime.checks import checks_json, write_junit
    from ..runtime.diff import DiffError, check_same_source, diff, text_perplexity
    t0 = time.perf_counter()
    if model and not text_file:
        _fail("--model goes with --text (it tokenizes the text and gives the float perplexity)")
    for path, flag in ((as_json, "--json"), (junit, "--junit")):
        if path and not Path(path).resolve().parent.is_dir():
            _fail(f"{flag} {path}: its folder does not exist")
    if text_file and not Path(text_file).is_file():
        _fail(f"--text {text_file}: no such file")
    art_a, art_b = load_artifact(a), load_artifact(b)
    try:
        check_same_source(art_a, art_b)   # before any perplexity run
    except DiffError as e:
        _fail(str(e))
    ppl = None
    if text_file:
        ppl = text_perplexity({"a": art_a, "b": art_b}, text_file, seq_len, n_windows, model, progress=not quiet)
    res = diff(art_a, art_b, ppl, max_layer_error_increase)
    checks = res["checks"]
    failed = [c for c in checks if not c.passed]
    # the files first: a reader of stdout that goes away (`| head`) must not cost the CI its report
    if as_json:
        Path(as_json).write_text(json.dumps({**res, "checks": checks_json(checks), "passed": not failed},
                                            indent=1) + "\n")
    if junit:
        props = {"a": str(art_a.path), "b": str(art_b.path)}
        if max_layer_error_increase is not None:
            props["max_layer_error_increase"] = max_layer_error_increase
        write_junit(junit, "dcc diff", checks, time.perf_counter() - t0, props)
    ma, mb = art_a.manifest, art_b.manifest
    for key, art, m in (("A", art_a, ma), ("B", art_b, mb)):
        click.echo(f"{key}: {art.path} (target {m['target']}, algo {m['recipe'].get('algo')}, dcc "
                   f"{m['versions'].get('dcc')})")
    _print_recipe(res["recipe"])
    _print_sizes(res["sizes"])
    _print_layers(res["layers"], all_layers)
    _print_summary(res["summary"], res["perplexity"], text_file)
    if checks:
        click.echo(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
        for c in failed:
            click.echo(c.line())
    if failed:
        _fail(f"{len(failed)} of {len(checks)} checks failed, first: {failed[0].name}", 1)
