"""Two artifacts of one model side by side (`dcc diff A B`): their recipe differences, their sizes, each layer's
weight SQNR and output error from the manifests (B minus A), which is better overall (mean layer output error, or
perplexity on a text), and CI checks on each layer's output-error increase (dcc/runtime/checks.py)."""
from __future__ import annotations

import math
from statistics import fmean

from ..targets.artifact import MANIFEST
from .artifact import Artifact
from .checks import Check
from .layer_names import natural_key
from .validate import config_difference


class DiffError(ValueError):
    """The two artifacts cannot be compared (different source models); one line saying which field differs."""


def check_same_source(a: Artifact, b: Artifact) -> None:
    """Refuse artifacts of different models: architecture and every size field validate compares must agree."""
    sa, sb = a.manifest.get("source") or {}, b.manifest.get("source") or {}
    if sa.get("architecture") != sb.get("architecture"):
        raise DiffError(f"{a.path} and {b.path} are not of the same model (architecture {sa.get('architecture')} "
                        f"vs {sb.get('architecture')})")
    if sa.get("num_blocks") != sb.get("num_blocks"):
        raise DiffError(f"{a.path} and {b.path} are not of the same model (num_blocks {sa.get('num_blocks')} vs "
                        f"{sb.get('num_blocks')})")
    diff = config_difference(a.config, b.config, sa.get("kind") == "diffusers")   # the fields validate compares
    if diff is not None:
        key, va, vb = diff
        raise DiffError(f"{a.path} and {b.path} are not of the same model ({key} {va} vs {vb})")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recipe_view(m: dict) -> dict:
    """The fields of a manifest that say how it was made, flat: target, recipe (options, weight spec, calibration,
    seed), the pass list and each pass's options (by pass name; a repeated pass gets #2, #3), run-time numerics,
    versions."""
    r = dict(m.get("recipe") or {})
    pipeline = r.pop("pipeline", [])
    view = {"target": m.get("target"), "engines": ", ".join(m.get("engines") or []), "dtype": m.get("dtype")}
    view.update(_flat(r, "recipe."))
    view["passes"] = " -> ".join(s["pass"] for s in pipeline)
    seen: dict[str, int] = {}
    for s in pipeline:
        seen[s["pass"]] = seen.get(s["pass"], 0) + 1
        name = s["pass"] + (f"#{seen[s['pass']]}" if seen[s["pass"]] > 1 else "")
        view.update(_flat(s.get("config") or {}, f"pass.{name}."))
    view.update(_flat(m.get("runtime") or {}, "runtime."))
    view.update(_flat(m.get("versions") or {}, "versions."))
    return view


def recipe_diff(ma: dict, mb: dict) -> list[dict]:
    """[{key, a, b}] for every recipe field whose value differs (None where one side lacks it)."""
    va, vb = _recipe_view(ma), _recipe_view(mb)
    keys = list(va) + [k for k in vb if k not in va]
    return [{"key": k, "a": va.get(k), "b": vb.get(k)} for k in keys if va.get(k) != vb.get(k)]


def _files(art: Artifact) -> dict[str, int]:
    names = list(art.manifest.get("files") or {}) + [MANIFEST]
    return {f: (art.path / f).stat().st_size for f in names if (art.path / f).is_file()}


def size_diff(a: Artifact, b: Artifact) -> dict:
    """Bytes per file (the manifest's files and dcc.json) and in total, each with B minus A."""
    fa, fb = _files(a), _files(b)
    files = {f: {"a": fa.get(f), "b": fb.get(f), "delta": (fb.get(f) or 0) - (fa.get(f) or 0)}
             for f in sorted(set(fa) | set(fb))}
    ta, tb = sum(fa.values()), sum(fb.values())
    return {"files": files, "total": {"a": ta, "b": tb, "delta": tb - ta}}


def _delta(x, y):
    return None if x is None or y is None else y - x


def layer_diff(ma: dict, mb: dict) -> dict:
    """Per layer present in both: format, SQNR and output error of A and B and their deltas (B minus A; a 16-bit
    layer has no error: None); the layers only in A or only in B."""
    la, lb = ma.get("layers") or {}, mb.get("layers") or {}
    common = sorted(set(la) & set(lb), key=natural_key)
    rows = {}
    for name in common:
        ea, eb = la[name], lb[name]
        row = {"format_a": "16-bit" if "skip_reason" in ea else ea.get("format"),
               "format_b": "16-bit" if "skip_reason" in eb else eb.get("format")}
        for key, short in (("weight_sqnr_db", "sqnr"), ("output_rel_err", "err")):
            row[f"{short}_a"], row[f"{short}_b"] = ea.get(key), eb.get(key)
            row[f"{short}_delta"] = _delta(ea.get(key), eb.get(key))
        rows[name] = row
    return {"common": rows,
            "only_a": sorted(set(la) - set(lb), key=natural_key),
            "only_b": sorted(set(lb) - set(la), key=natural_key)}


def summary(layers: dict, ppl: dict | None = None) -> dict:
    """Which artifact is better overall: on perplexity when a text was measured, else on the mean output error of
    the layers where both have one (the compile-time error on the calibration data, recorded in the manifests)."""
    both = [r for r in layers["common"].values() if r["err_a"] is not None and r["err_b"] is not None]
    sq = [r for r in layers["common"].values() if r["sqnr_a"] is not None and r["sqnr_b"] is not None]
    out = {"layers_compared": len(both),
           "mean_err_a": fmean(r["err_a"] for r in both) if both else None,
           "mean_err_b": fmean(r["err_b"] for r in both) if both else None,
           "mean_sqnr_a": fmean(r["sqnr_a"] for r in sq) if sq else None,
           "mean_sqnr_b": fmean(r["sqnr_b"] for r in sq) if sq else None,
           "worse_layers": sum(r["err_b"] > r["err_a"] for r in both),
           "better_layers": sum(r["err_b"] < r["err_a"] for r in both)}
    if ppl and "a" in ppl and "b" in ppl:
        out["basis"] = "perplexity"
        va, vb = ppl["a"]["ppl"], ppl["b"]["ppl"]
    elif both:
        out["basis"] = "mean layer output_rel_err"
        va, vb = out["mean_err_a"], out["mean_err_b"]
    else:
        out["basis"], out["better"] = None, None
        return out
    out["better"] = "a" if va < vb else "b" if vb < va else "same"
    return out


def relative_increase(a: float, b: float) -> float:
    """(b - a) / a: how much larger B's error is, as a fraction of A's (0 when both are 0, inf when only A's is)."""
    if a == 0:
        return 0.0 if b == 0 else math.inf
    return (b - a) / a


def layer_checks(layers: dict, max_increase: float) -> list[Check]:
    """One check per layer present (and quantized) in both: B's output_rel_err may exceed A's by at most
    `max_increase`, a fraction of A's (0.1 = 10 % worse)."""
    return [Check(f"layer {name} output_rel_err increase", relative_increase(r["err_a"], r["err_b"]), max_increase)
            for name, r in layers["common"].items() if r["err_a"] is not None and r["err_b"] is not None]


def text_perplexity(arts: dict[str, Artifact], text, seq_len: int, limit: int | None, model=None,
                    progress: bool = True) -> dict:
    """Perplexity of each artifact (CPU reference of its decoded weights) on `text`, through the eval machinery of
    `dcc eval --ppl` (same tokenization and windows for both); with `model` (the source folder), its tokenizer reads
    the text where an artifact holds none, and the float model's perplexity is measured too ("source")."""
    from ..models.loader import LazyModel
    from .evaluate import eval_adapter, eval_data
    from .reference import build_model
    from .validate import check_same_model
    lm = None
    if model is not None:
        lm = LazyModel(model)
        for art in arts.values():
            check_same_model(art, lm.config.to_dict(), model)
    out, data = {}, None
    for key, art in arts.items():
        adapter = eval_adapter(art, "--ppl", None)
        data = eval_data(art, adapter, text, seq_len, limit, lm.path if lm is not None else None)
        out[key] = adapter.evaluate(build_model(art), data, progress=progress)["artifact"]
    if lm is not None:
        from ..models.causal_lm import perplexity
        out["source"] = perplexity(lm.materialize_all(), data, progress=progress, desc="source")
    return out


def diff(a: Artifact, b: Artifact, ppl: dict | None = None, max_increase: float | None = None) -> dict:
    """Everything `dcc diff` reports, JSON-ready (checks as dcc.runtime.checks.Check; checks_json for JSON)."""
    check_same_source(a, b)
    layers = layer_diff(a.manifest, b.manifest)
    checks = [] if max_increase is None else layer_checks(layers, max_increase)
    return {"a": str(a.path), "b": str(b.path), "recipe": recipe_diff(a.manifest, b.manifest),
            "sizes": size_diff(a, b), "layers": layers, "perplexity": ppl, "summary": summary(layers, ppl),
            "checks": checks}
