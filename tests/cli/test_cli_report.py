"""`dcc report ARTIFACT`: the HTML page parsed with the standard library's html.parser -- every layer of the
manifest listed, the SVG charts inline, nothing external (no scripts, no remote links or sources), the --dump-dir
dumps linked relatively to files that exist -- the default path, no overwrite without --force, and the one-line
errors (missing matplotlib/jinja2 included)."""
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cli_util import error_line, run
from tiny_lm_artifacts import compile_tiny, tiny_lm
from tiny_models import one_thread  # noqa: F401  (autouse fixture)


class Page(HTMLParser):
    """Tags, attributes, the cells of table rows, and the text inside <svg> elements."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.cells, self.svgs = [], [], [], 0
        self._svg_depth, self._in_td, self._cell = 0, False, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "svg":
            self.svgs += self._svg_depth == 0
            self._svg_depth += 1
        if tag == "td":
            self._in_td, self._cell = True, []

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg_depth -= 1
        if tag == "td" and self._in_td:
            self.cells.append("".join(self._cell).strip())
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self._cell.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    model, calib, _ = tiny_lm(d)
    return {r: (compile_tiny(model, calib, d / r, r, d / f"dump_{r}"), d / f"dump_{r}")
            for r in ("awq", "nunchaku", "qserve")}


def _layers(art: Path) -> list[str]:
    return list(json.loads((art / "dcc.json").read_text())["layers"])


@pytest.mark.parametrize("recipe", ["awq", "nunchaku", "qserve"])
def test_page_lists_every_layer_with_inline_charts(arts, recipe, tmp_path):
    art, dumps = arts[recipe]
    out = tmp_path / "sub" / "r.html"
    out.parent.mkdir()
    code, text = run("report", art, "-o", out, "--dump-dir", dumps)
    assert code == 0, text
    page = parse(out)
    for name in _layers(art):
        assert name in page.cells, name
    # charts: inline <svg> elements (layer error, pass times, scales at least), never an <img> or <object>
    assert page.svgs >= 3 and "img" not in page.tags and "object" not in page.tags
    assert "script" not in page.tags and "iframe" not in page.tags and "link" not in page.tags
    for tag, key, value in page.attrs:
        if key.startswith("xmlns"):       # SVG namespace names, not links
            continue
        assert not value.startswith(("http:", "https:", "//", "file:")), (tag, key, value)
        if key in ("href", "xlink:href") and not value.startswith("#"):
            assert (out.parent / value).exists(), value   # a dump, linked relative to the page
    links = [v for t, k, v in page.attrs if t == "a" and k == "href" and not v.startswith("#")]
    assert any(v.endswith(".txt") for v in links) and all(v.startswith("../../") for v in links)
    html = out.read_text()
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html


def test_sections_by_target(arts, tmp_path):
    code, text = run("report", arts["nunchaku"][0], "-o", tmp_path / "n.html")
    assert code == 0, text
    html = (tmp_path / "n.html").read_text()
    assert 'id="chart-lowrank-energy"' in html and 'id="chart-smooth-hist"' in html
    assert "give --dump-dir DIR" in html                       # no times without the dumps, and it says so
    code, text = run("report", arts["qserve"][0], "-o", tmp_path / "q.html", "--dump-dir", arts["qserve"][1])
    assert code == 0, text
    html = (tmp_path / "q.html").read_text()
    assert 'id="chart-smooth-groups"' in html and 'id="chart-pass-times"' in html and 'id="chart-clip"' in html
    assert 'id="chart-lowrank-energy"' not in html and "No 16-bit low-rank branch" in html


def test_default_path_and_no_overwrite_without_force(arts):
    art = arts["awq"][0]
    page = art.parent / f"{art.name}-report.html"
    code, text = run("report", art)
    assert code == 0 and page.is_file(), text
    page.write_text("mine")
    code, text = run("report", art)
    assert code == 2 and "exists (use --force" in error_line(text)
    assert page.read_text() == "mine"
    code, text = run("report", art, "--force")
    assert code == 0, text
    assert all(name in parse(page).cells for name in _layers(art))
    assert not [p for p in art.parent.iterdir() if p.name.startswith(f".{page.name}.")]   # no temporary left
    page.unlink()


def test_bad_input(arts, tmp_path):
    code, text = run("report", tmp_path / "nothing")
    assert code == 2 and "not an artifact folder" in error_line(text)
    code, text = run("report", arts["awq"][0], "-o", tmp_path / "r.html", "--dump-dir", tmp_path)
    assert code == 2 and "holds no pass dumps" in error_line(text)
    code, text = run("report", arts["awq"][0], "-o", tmp_path / "no" / "r.html")
    assert code == 2 and "its folder does not exist" in error_line(text)
    assert not (tmp_path / "r.html").exists()


def test_missing_dependencies_one_line(arts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    code, text = run("report", arts["awq"][0], "-o", tmp_path / "r.html")
    assert code == 2
    assert error_line(text) == "dcc: error: dcc report needs matplotlib and jinja2: pip install 'dcc[report]'"
    assert not (tmp_path / "r.html").exists()
