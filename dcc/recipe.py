"""Recipes: a whole compilation as data (target, the target's options, the pass list, seed and calibration shape),
read from YAML or JSON, or from an artifact's dcc.json, whose "recipe" section is one. So

    dcc compile MODEL --recipe out/dcc.json --calib calib.txt -o again/

reproduces `out/` byte for byte from the same model and calibration file. A recipe may hold only some fields (the
shortest is a pass list); what it leaves out comes from the command line or the target's defaults.

    target: NAME                 # a registered target (dcc compile --help lists them)
    options: {algo: rtn, group_size: 128}
    passes:                      # optional: replaces the algorithm's pass list
      - {pass: fuse_norms}
      - {pass: rtn}
    seed: 0
    calibration: {chunks: 16, seq_len: 256}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Recipe:
    """What a recipe file fixes; None (or empty) where it leaves the choice to the command line or the defaults."""
    path: Path
    target: str | None = None
    options: dict = field(default_factory=dict)
    passes: list | None = None          # list[compiler.pass_manager.Step]
    label: str | None = None            # the manifest's "algo" for an artifact made from this recipe
    seed: int | None = None
    calib_chunks: int | None = None
    calib_seq_len: int | None = None
    calib_sha256: str | None = None


def _read(p: Path) -> dict:
    import yaml
    text = p.read_text()
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{p}: not a recipe ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: not a recipe (expected a mapping with target, options, passes, ...)")
    if doc.get("format") == "dcc-artifact":   # an artifact's manifest: its recipe section
        doc = doc.get("recipe")
        if not isinstance(doc, dict):
            raise ValueError(f"{p}: this dcc.json has no recipe section")
    return doc


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON) or an artifact's dcc.json; every problem is one line naming the file."""
    from .compiler.pass_manager import Step
    p = Path(path)
    if p.is_dir() and (p / "dcc.json").is_file():
        p = p / "dcc.json"
    if not p.is_file():
        raise ValueError(f"{p}: no such recipe file")
    doc = _read(p)
    passes = doc.get("passes", doc.get("pipeline"))
    try:
        steps = None if passes is None else [Step.from_dict(d) for d in passes]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a recipe (expected 'passes: [{{pass: NAME, config: {{...}}}}, ...]': {e})"
                         ) from None
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    if steps is not None and not steps:
        raise ValueError(f"{p}: the recipe lists no passes")
    options = doc.get("options") or {}
    calib = doc.get("calibration") or {}
    if not isinstance(options, dict) or not isinstance(calib, dict):
        raise ValueError(f"{p}: options and calibration must be mappings")
    if steps is None and not doc.get("target") and not options:
        raise ValueError(f"{p}: the recipe names no target, options or passes")
    label = doc.get("algo") if "options" in doc else None
    return Recipe(p, target=doc.get("target"), options=dict(options), passes=steps,
                  label=label if isinstance(label, str) else None, seed=doc.get("seed"),
                  calib_chunks=calib.get("chunks"), calib_seq_len=calib.get("seq_len"),
                  calib_sha256=calib.get("sha256"))
