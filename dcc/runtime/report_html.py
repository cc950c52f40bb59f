"""`dcc report`'s page: the data of dcc/runtime/report_data.py rendered through the jinja2 template
dcc/runtime/templates/report.html.j2, with the charts of dcc/runtime/report_charts.py inlined as SVG -- one file,
nothing fetched from anywhere; dump files are linked relative to the page."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from .. import __version__
from . import report_charts as charts
from .html_report import write_atomic

TEMPLATES = Path(__file__).resolve().parent / "templates"
# every chart and note the template may show (absent: None), so that the template runs under StrictUndefined
CHARTS = ("layers", "times", "scales", "clip", "smooth", "smooth_hist", "smooth_groups", "lowrank")
NOTES = ("times", "scales", "clip", "smooth", "lowrank", "branch_failed")
MISSING_DEPS = "dcc report needs matplotlib and jinja2: pip install 'dcc[report]'"


def check_deps() -> str | None:
    """None when matplotlib and jinja2 import, else the one line saying how to install them."""
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING_DEPS
    return None


def _href(target: Path, page_dir: Path) -> str | None:
    """A relative URL from the page's folder to `target` (None where there is none, e.g. another drive)."""
    try:
        rel = os.path.relpath(Path(target).resolve(), page_dir.resolve())
    except ValueError:
        return None
    return quote(Path(rel).as_posix())


def _dump_links(data: dict, page_dir: Path) -> dict:
    """{block prefix: [(label, href)]} of every dump file, and each layer's link (its block's last dump)."""
    d = data["dumps"]
    if d is None:
        return {"blocks": {}, "onnx": [], "root": None}
    blocks = {b: [(f.name, _href(f, page_dir)) for f in files] for b, files in d.files.items()}
    for r in data["layers"]:
        txt = [f for f in d.files.get(r["prefix"] or "", []) if f.suffix == ".txt"]
        r["dump_href"] = _href(txt[-1], page_dir) if txt else None
        r["dump_label"] = txt[-1].name if txt else None
    return {"blocks": blocks, "onnx": [(f.name, _href(f, page_dir)) for f in d.onnx],
            "root": _href(d.root, page_dir)}


def _charts(data: dict) -> dict:
    """Every chart the data allows, as SVG text (absent keys: nothing to draw)."""
    out = {}
    panels = [(s, y, log) for s, y, log in ((data["err_by_kind"], "output_rel_err", True),
                                            (data["sqnr_by_kind"], "weight SQNR (dB)", False)) if s]
    if panels:
        out["layers"] = charts.by_block(panels, "layer-error")
    if data["times"]["seconds"]:
        out["times"] = charts.bars(data["times"]["seconds"], "seconds (all blocks)", "pass-times")
    if data["scales"]["log2"]:
        out["scales"] = charts.histogram(data["scales"]["log2"], "log2 |scale|", "scales")
    if data["clip"]:
        import numpy as np
        out["clip"] = charts.histogram({"clip ratio": np.array(data["clip"])}, "clip ratio (mean per layer)",
                                       "clip", bins=30)
    if data["smooth_by_kind"]:
        out["smooth"] = charts.by_block([(data["smooth_by_kind"], "max smoothing factor", True)], "smooth-max")
    if data["smooth_log10"].size:
        out["smooth_hist"] = charts.histogram({"smooth": data["smooth_log10"]}, "log10 smoothing factor",
                                              "smooth-hist")
    rows = [{**g, "block": g["index"], "label": f"{g['pass']}: {g['group']}"} for g in data["smooth_groups"]
            if g["min"] is not None and g["max"] is not None]
    if rows:
        out["smooth_groups"] = charts.ranges(rows, "factor (min-max)", "smooth-groups")
    if data["energy_by_kind"]:
        out["lowrank"] = charts.by_block([(data["energy_by_kind"], "low-rank energy ||L||²/||W||²", False)],
                                         "lowrank-energy")
    return out


def render(data: dict, page: Path) -> str:
    import jinja2
    from markupsafe import Markup   # jinja2's own dependency
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, spec=".4g": "-" if v is None else format(v, spec)
    env.filters["mib"] = lambda n: f"{n / 2**20:.3f} MiB"
    links = _dump_links(data, page.parent)
    svg = {k: None for k in CHARTS} | {k: Markup(v) for k, v in _charts(data).items()}
    data = {**data, "notes": {k: None for k in NOTES} | data["notes"]}
    return env.get_template("report.html.j2").render(d=data, charts=svg, links=links, version=__version__)


def write(data: dict, page) -> Path:
    """Render the page for `page`'s folder (dump links are relative to it) and write it atomically."""
    page = Path(page)
    return write_atomic(page, render(data, page))
