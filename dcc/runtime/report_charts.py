"""The charts of `dcc report` as inline SVG, drawn by matplotlib's object API (a Figure and its SVG canvas: no pyplot,
so no global backend or figure state is touched). Text stays text (svg.fonttype none) and the output is stable
(fixed hash salt, no date), so one artifact always gives the same page."""
from __future__ import annotations

import io
import re

import numpy as np

WIDTH = 9.0   # inches; the page shows charts at their natural size
_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def _figure(height: float = 3.2, cols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def to_svg(fig, name: str) -> str:
    """The figure as an <svg> element to paste into HTML: no XML declaration, DOCTYPE or RDF metadata (which holds
    URLs), ids salted by `name` so that several charts on one page never share an id."""
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"dcc-{name}"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = _METADATA.sub("", _XML_HEAD.sub("", buf.getvalue(), count=1), count=1)
    return text.replace("<svg ", f'<svg class="chart" id="chart-{name}" role="img" aria-label="{name}" ', 1)


def _legend(ax, n: int) -> None:
    if n:
        ax.legend(fontsize=7, ncol=1 if n <= 8 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)


def by_block(panels: list[tuple[dict, str, bool]], name: str) -> str:
    """One panel per (series, y label, log y): x = block index, one line per layer kind ({kind: [(block, y)]})."""
    fig, axes = _figure(3.4, len(panels))
    for ax, (series, ylabel, log) in zip(axes, panels):
        for kind, pts in series.items():
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", markersize=3, linewidth=1, label=kind)
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        if log and all(v > 0 for pts in series.values() for _, v in pts):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        blocks = sorted({b for pts in series.values() for b, _ in pts})
        if blocks and len(blocks) <= 12:
            ax.set_xticks(blocks)
    _legend(axes[-1], len(panels[-1][0]))
    return to_svg(fig, name)


def bars(values: dict[str, float], xlabel: str, name: str) -> str:
    """Horizontal bars, one per key, in the given order (top to bottom)."""
    fig, (ax,) = _figure(0.6 + 0.28 * len(values))
    labels = list(values)
    ax.barh(range(len(labels)), [values[k] for k in labels], color="#4878a8")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    return to_svg(fig, name)


def histogram(samples: dict[str, np.ndarray], xlabel: str, name: str, bins: int = 60) -> str:
    """Overlaid step histograms, one per label, on shared bins."""
    fig, (ax,) = _figure(3.0)
    allv = np.concatenate([v for v in samples.values() if v.size]) if samples else np.zeros(0)
    if allv.size:
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for label, v in samples.items():
            ax.hist(v, bins=edges, histtype="step", linewidth=1.2, label=f"{label} ({v.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(samples))
    return to_svg(fig, name)


def ranges(rows: list[dict], ylabel: str, name: str) -> str:
    """Min-max range (a vertical bar) of each row's factors at x = its block, one colour per row["label"] (the
    labels side by side within a block)."""
    fig, (ax,) = _figure(3.2)
    labels = sorted({r["label"] for r in rows})
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        pts = [r for r in rows if r["label"] == label and r["block"] is not None]
        x = [r["block"] - 0.4 + width * (i + 0.5) for r in pts]
        ax.vlines(x, [r["min"] for r in pts], [r["max"] for r in pts], colors=f"C{i % 10}", linewidth=4,
                  label=label)
    blocks = sorted({r["block"] for r in rows if r["block"] is not None})
    if blocks and len(blocks) <= 12:
        ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    if all(r["min"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(labels))
    return to_svg(fig, name)
