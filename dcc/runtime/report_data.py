"""What `dcc report` shows, gathered from an artifact (and optionally its compile's --dump-dir): the manifest header
and recipe, per-pass times, every layer's error placed by block and layer kind, a sample of the stored per-group
scales, clip ratios, smoothing factors, and the share of each weight the 16-bit low-rank branch holds (SVDQuant).
Plain data (lists, dicts, numpy arrays); dcc/runtime/report_html.py draws it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..targets.artifact import MANIFEST
from .artifact import Artifact
from .layer_names import natural_key, placer
from .report_dumps import Dumps

SCALE_BUDGET = 20000    # scale values sampled across all layers (the histogram's shape needs no more)
# stored scale tensors: scales, wscales, s1_scales, s2_scales, dequant_scale, wtscale ... (not scaled_zeros)
_SCALE = re.compile(r"scales?$")


def header(art: Artifact) -> dict:
    m = art.manifest
    names = list(m.get("files") or {}) + [MANIFEST]
    files = {f: (art.path / f).stat().st_size for f in names if (art.path / f).is_file()}
    layers = m.get("layers") or {}
    source = {"model": "?", "architecture": "?", "kind": "causal-lm", "num_blocks": "?", "blocks": "?",
              **(m.get("source") or {})}
    return {"name": art.path.name, "path": str(art.path), "target": m.get("target"), "engines": m.get("engines", []),
            "dtype": m.get("dtype"), "source": source, "versions": m.get("versions") or {},
            "runtime": {k: v for k, v in (m.get("runtime") or {}).items() if v not in (None, {}, [])},
            "files": files, "size_bytes": sum(files.values()), "layers": len(layers),
            "quantized": sum("skip_reason" not in e for e in layers.values())}


def recipe(m: dict) -> dict:
    r = m.get("recipe") or {}
    return {"algo": r.get("algo"), "seed": r.get("seed"), "options": r.get("options") or {},
            "weight": r.get("weight") or {}, "calibration": r.get("calibration") or {},
            "pipeline": [{"pass": s["pass"], "config": json.dumps(s.get("config") or {}, sort_keys=True)}
                         for s in r.get("pipeline") or []]}


def pass_times(m: dict, dumps: Dumps | None) -> dict:
    """Seconds per pass: from the manifest where it records them (a pipeline entry's "seconds", or a "timing"
    table), else summed over the blocks of the --dump-dir dumps; None when neither has them."""
    pipe = (m.get("recipe") or {}).get("pipeline") or []
    if any(isinstance(s.get("seconds"), (int, float)) for s in pipe):
        secs: dict[str, float] = {}
        for s in pipe:
            secs[s["pass"]] = secs.get(s["pass"], 0.0) + float(s.get("seconds") or 0.0)
        return {"source": "manifest", "seconds": secs, "by_block": {}}
    timing = m.get("timing")
    if isinstance(timing, dict) and timing and all(isinstance(v, (int, float)) for v in timing.values()):
        return {"source": "manifest", "seconds": dict(timing), "by_block": {}}
    if dumps is not None and dumps.seconds:
        return {"source": "dumps", "seconds": dict(dumps.seconds), "by_block": dumps.seconds_by_block}
    return {"source": None, "seconds": {}, "by_block": {}}


def layer_rows(art: Artifact, dumps: Dumps | None) -> list[dict]:
    """One row per layer of the manifest (quantized or kept 16-bit), in natural order."""
    layers = art.manifest.get("layers") or {}
    place = placer(art.manifest, layers)
    rows = []
    for name in sorted(layers, key=natural_key):
        e, p = layers[name], place(name)
        spec = e.get("spec") or {}
        rows.append({"name": name, "block": p.block, "prefix": p.prefix, "kind": p.kind,
                     "shape": "x".join(map(str, e.get("shape") or [])),
                     "format": "16-bit (kept)" if "skip_reason" in e else e.get("format"),
                     "group_size": spec.get("group_size"), "sqnr": e.get("weight_sqnr_db"),
                     "err": e.get("output_rel_err"), "skip_reason": e.get("skip_reason"), "rank": e.get("rank"),
                     "act": e.get("act"), "clip": dumps.clip.get(name) if dumps else None,
                     "smooth_max": None, "smooth_median": None, "lowrank_energy": None})
    return rows


def _reference(art: Artifact, name: str, fmt, shape) -> torch.nn.Module | None:
    """The format's CPU reference module of a layer (its tensors unpacked, padding cropped), or None where the
    format has none or it cannot be built from these tensors (e.g. a single file's renamed ones)."""
    if fmt.reference is None:
        return None
    keys = art.tensors.key_to_file
    try:
        tensors = {t: art.tensors.get(f"{name}.{t}") for t in fmt.tensors}
        bias = art.tensors.get(f"{name}.bias") if f"{name}.bias" in keys else None
        return fmt.reference(tensors, shape[0], shape[1], bias)
    except Exception:   # noqa: BLE001 - reported as "not read back" on the page
        return None


def _sample(v: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return v if v.numel() <= n else v[torch.randperm(v.numel(), generator=gen)[:n]]


def _scales(art: Artifact, name: str, fmt, mod) -> dict[str, torch.Tensor]:
    """A layer's scale tensors: the reference module's (unpacked, padding cropped) where it holds any, else the
    stored ones (their zeros -- padding -- are left out by the caller)."""
    if mod is not None:
        found = {k: b for k, b in mod.named_buffers() if _SCALE.search(k) and "zero" not in k}
        if found:
            return found
    keys = art.tensors.key_to_file
    return {t: art.tensors.get(f"{name}.{t}") for t in fmt.tensors
            if _SCALE.search(t) and "zero" not in t and f"{name}.{t}" in keys}


def tensor_stats(art: Artifact, rows: list[dict], budget: int = SCALE_BUDGET, seed: int = 0) -> dict:
    """Per quantized layer, from its stored tensors (read back through the format's reference module where it has
    one): a seeded sample of its scales (log2 |scale|, by tensor name, about `budget` values in all); the max and
    median of its smoothing factors; and the low-rank energy ||L||^2 / ||W||^2 in the smoothed basis where the SVD
    was taken (W = decoded main branch + L, L = lora_up @ lora_down scaled by smooth). The row dicts are filled in
    place; returns the samples and the layers that could not be read back."""
    by_name = {r["name"]: r for r in rows}
    q = art.quantized_layers()
    per_layer = max(64, budget // max(1, len(q)))
    gen = torch.Generator().manual_seed(seed)
    scales: dict[str, list[np.ndarray]] = {}
    smooth_vals, failed, total = [], [], 0
    for name in sorted(q, key=natural_key):
        fmt = art.format_of(name)
        mod = _reference(art, name, fmt, q[name]["shape"])
        if mod is None and fmt.reference is not None and {"smooth", "lora_down"} & set(fmt.tensors):
            failed.append(name)
        for t, v in _scales(art, name, fmt, mod).items():
            v = v.detach().float().flatten().abs()
            v = v[torch.isfinite(v) & (v > 0)]
            total += v.numel()
            scales.setdefault(t, []).append(_sample(v, per_layer, gen).log2().numpy())
        if mod is None:
            continue
        k = q[name]["shape"][1]
        s = getattr(mod, "smooth", None)
        s = None if s is None else s.detach().double().flatten()[:k]
        if s is not None:
            row = by_name[name]
            row["smooth_max"], row["smooth_median"] = float(s.abs().max()), float(s.abs().median())
            smooth_vals.append(_sample(s.abs()[s.abs() > 0].float(), per_layer, gen).log10().numpy())
        up, down = getattr(mod, "lora_up", None), getattr(mod, "lora_down", None)
        if up is not None and down is not None and getattr(mod, "weight", None) is not None:
            w = mod.weight.detach().double()
            low = up.detach().double() @ down.detach().double()
            if s is not None:
                w, low = w * s.view(1, -1), low * s.view(1, -1)
            norm = float(w.pow(2).sum())
            by_name[name]["lowrank_energy"] = float(low.pow(2).sum()) / norm if norm > 0 else None
    return {"scales": {"log2": {t: np.concatenate(v) for t, v in scales.items()}, "total": total,
                       "per_layer": per_layer},
            "smooth_log10": np.concatenate(smooth_vals) if smooth_vals else np.zeros(0), "failed": failed}


def series_by_kind(rows: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """{layer kind: [(block, value)]} of the rows inside blocks that have `key`, each sorted by block."""
    out: dict[str, list] = {}
    for r in rows:
        if r["block"] is not None and r[key] is not None:
            out.setdefault(r["kind"], []).append((r["block"], r[key]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _notes(m: dict, rows: list[dict], dumps: Dumps | None, times: dict, stats: dict, scales: dict) -> dict:
    """What a section cannot show, and why (keyed by section)."""
    passes = {s["pass"] for s in (m.get("recipe") or {}).get("pipeline") or []}
    notes = {}
    if times["source"] is None:
        notes["times"] = ("The manifest records no per-pass times; give --dump-dir DIR (the folder of `dcc compile "
                          "--dump-dir DIR`) to read them from the pass dumps.")
    if not scales["log2"]:
        notes["scales"] = "No stored scale tensors in this artifact's layer formats."
    if not any(r["clip"] is not None for r in rows):
        notes["clip"] = ("No clip pass in this recipe." if "clip" not in passes else
                         "The clip pass's ratios are recorded only in the pass dumps: give --dump-dir DIR.")
    failed = stats["failed"]
    unread = (f"the smoothing vectors and low-rank branches of {len(failed)} layers could not be read back from "
              f"their stored tensors (fused or renamed, as in a single file; first: {failed[0]})" if failed else "")
    if not any(r["smooth_max"] is not None for r in rows):
        smoothed = passes & {"smooth", "smooth_attention", "awq"}
        notes["smooth"] = (f"Not shown: {unread}." if failed else "No smoothing in this recipe." if not smoothed else
                           f"{', '.join(sorted(smoothed))} folded the smoothing factors into the weights and norms, "
                           f"so the artifact holds none; what each group got is recorded in the pass dumps"
                           + (" (below)." if dumps and dumps.smoothing else " (give --dump-dir DIR)."))
    if not any(r["lowrank_energy"] is not None for r in rows):
        notes["lowrank"] = f"Not shown: {unread}." if failed else "No 16-bit low-rank branch in this artifact."
    elif failed:
        notes["branch_failed"] = f"Partly shown: {unread}."
    return notes


def gather(art: Artifact, dumps: Dumps | None = None) -> dict:
    """Everything the report page shows."""
    m = art.manifest
    rows = layer_rows(art, dumps)
    stats = tensor_stats(art, rows)
    scales = stats["scales"]
    times = pass_times(m, dumps)
    place = placer(m, m.get("layers") or {})
    blocks = [{"prefix": k, "block": place(k + ".x").block, "err": v.get("output_rel_err")}
              for k, v in sorted((m.get("blocks") or {}).items(), key=lambda kv: natural_key(kv[0]))]
    blocks.sort(key=lambda b: (b["block"] is None, b["block"] or 0))
    return {"header": header(art), "recipe": recipe(m), "times": times, "layers": rows, "blocks": blocks,
            "err_by_kind": series_by_kind(rows, "err"), "sqnr_by_kind": series_by_kind(rows, "sqnr"),
            "energy_by_kind": series_by_kind(rows, "lowrank_energy"),
            "smooth_by_kind": series_by_kind(rows, "smooth_max"),
            "scales": scales, "clip": [r["clip"] for r in rows if r["clip"] is not None],
            "smooth_log10": stats["smooth_log10"],
            "smooth_groups": [{**g, "index": place(g["block"] + ".x").block}
                              for g in (dumps.smoothing if dumps else [])],
            "dumps": dumps, "notes": _notes(m, rows, dumps, times, stats, scales),
            "manifest_path": str(Path(art.path) / MANIFEST)}
