"""What a `dcc compile --dump-dir` folder adds to a report: each pass's time (summed over blocks), the clip ratios
and smoothing factors the passes chose (recorded in their results, not in the artifact), and the dump files of each
block, to link from the page. Layout (dcc/ir/dump.py): DIR/<block>/<step>_<pass>.{txt,json}, DIR/model/<phase>_...,
DIR/<first block>.onnx."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .layer_names import natural_key


@dataclass
class Dumps:
    root: Path
    seconds: dict[str, float] = field(default_factory=dict)          # pass -> seconds, all blocks
    seconds_by_block: dict[str, dict[str, float]] = field(default_factory=dict)   # block -> pass -> seconds
    clip: dict[str, float] = field(default_factory=dict)             # full layer name -> mean clip ratio
    smoothing: list[dict] = field(default_factory=list)              # one row per smoothed group / attention
    files: dict[str, list[Path]] = field(default_factory=dict)       # block prefix (or "model") -> dump files
    onnx: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


# the min/max of the factors a smoothing pass records per group (smooth: s; smooth_attention: lambda); a pass that
# records only its migration strength alpha per group (awq) gives a row without them
_FACTOR_KEYS = (("s_min", "s_max"), ("lambda_min", "lambda_max"))


def _smoothing_rows(block: str, pass_name: str, details: dict) -> list[dict]:
    rows = []
    for groups in details.values():
        if not isinstance(groups, dict):
            continue
        for group, rec in groups.items():
            if not isinstance(rec, dict):
                continue
            lo, hi = next(((lo, hi) for lo, hi in _FACTOR_KEYS if lo in rec and hi in rec), (None, None))
            if lo is None and "alpha" not in rec:
                continue
            rows.append({"block": block, "pass": pass_name, "group": group, "kind": rec.get("kind", ""),
                         "alpha": rec.get("alpha"), "min": rec.get(lo), "max": rec.get(hi)})
    return rows


def _clip_ratios(block: str, details: dict, linears: dict | None) -> dict[str, float]:
    out = {}
    for name, rec in details.items():
        if isinstance(rec, dict) and "mean_ratio" in rec:
            out[f"{block}.{name}"] = float(rec["mean_ratio"])
    for name, rec in (linears or {}).items():   # later dumps carry the ratio on each linear
        c = rec.get("clip") if isinstance(rec, dict) else None
        if isinstance(c, dict) and "mean" in c:
            out.setdefault(f"{block}.{name}", float(c["mean"]))
    return out


def read_dumps(root) -> Dumps:
    """Read every JSON dump under `root` (a folder written by `dcc compile --dump-dir`)."""
    root = Path(root)
    d = Dumps(root)
    d.onnx = sorted(root.glob("*.onnx"), key=lambda p: natural_key(p.name))
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        files = sorted((f for f in sub.iterdir() if f.suffix in (".txt", ".json")), key=lambda p: natural_key(p.name))
        if not files:
            continue
        d.files[sub.name] = files
        for f in files:
            if f.suffix != ".json":
                continue
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                d.unreadable.append(str(f))
                continue
            res = rec.get("result") or {}
            details = res.get("details") or {}
            name, block = rec.get("pass"), rec.get("block") or sub.name
            if not name or name == "capture":
                continue
            secs = details.get("seconds")
            if isinstance(secs, (int, float)):
                d.seconds[name] = d.seconds.get(name, 0.0) + float(secs)
                d.seconds_by_block.setdefault(block, {})[name] = float(secs)
            if "block" in rec:
                d.clip.update(_clip_ratios(block, details, rec.get("linears")))
                d.smoothing.extend(_smoothing_rows(block, name, details))
    return d


def looks_like_dumps(root) -> bool:
    """A folder `dcc compile --dump-dir` wrote: at least one <block>/<NN>_<pass>.json."""
    root = Path(root)
    return root.is_dir() and any(root.glob("*/[0-9][0-9]_*.json"))
