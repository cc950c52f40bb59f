"""`dcc report ARTIFACT`: one self-contained HTML page about an artifact -- recipe, per-pass times, per-layer error by
block and layer type, scales, clip ratios, smoothing factors, low-rank energy, every layer -- with inline SVG charts
(dcc/runtime/report_data.py gathers, report_html.py renders; needs the optional extra dcc[report])."""
from __future__ import annotations

from pathlib import Path

import click

from .main import _fail, friendly, main


def default_output(artifact: Path) -> Path:
    """Beside the artifact, not inside it (the artifact's folder holds what compile wrote, checksummed)."""
    a = artifact.resolve()
    return a.parent / f"{a.name}-report.html"


@main.command("report")
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="The HTML file to write (default: ARTIFACT-report.html beside the artifact folder).")
@click.option("--dump-dir", type=click.Path(), default=None,
              help="The folder `dcc compile --dump-dir` wrote for this artifact: per-pass times, clip ratios and "
                   "smoothing factors are read from it, and every dump is linked from the page (relative links).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@friendly
def report(artifact, out, dump_dir, force):
    """Write an HTML report of ARTIFACT: one file, charts inline (SVG), no scripts and nothing fetched."""
    from ..runtime.report_html import check_deps
    missing = check_deps()
    if missing:
        _fail(missing)
    from ..runtime.artifact import load_artifact
    from ..runtime.report_data import gather
    from ..runtime.report_dumps import looks_like_dumps, read_dumps
    from ..runtime.report_html import write
    page = Path(out) if out else default_output(Path(artifact))
    if page.is_dir():
        _fail(f"{page}: is a folder; give -o FILE.html")
    if not page.resolve().parent.is_dir():
        _fail(f"-o {page}: its folder does not exist")
    if page.exists() and not force:
        _fail(f"{page}: exists (use --force to replace it)")
    dumps = None
    if dump_dir is not None:
        if not Path(dump_dir).is_dir():
            _fail(f"--dump-dir {dump_dir}: no such folder")
        if not looks_like_dumps(dump_dir):
            _fail(f"--dump-dir {dump_dir}: holds no pass dumps (<block>/<NN>_<pass>.json, as `dcc compile "
                  f"--dump-dir` writes)")
        dumps = read_dumps(dump_dir)
    art = load_artifact(artifact)
    data = gather(art, dumps)
    if dumps is not None:
        blocks = {r["prefix"] for r in data["layers"] if r["prefix"]}
        if blocks and not blocks & set(dumps.files):
            click.echo(f"warning: --dump-dir {dump_dir} has no dumps of this artifact's blocks (first: "
                       f"{sorted(blocks)[0]})", err=True)
    written = write(data, page)
    click.echo(f"wrote {written} ({len(data['layers'])} layers)", err=True)
