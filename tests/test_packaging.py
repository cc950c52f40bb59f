"""The wheel's package list is explicit (pyproject.toml maps csrc/ into dcc/_csrc), so a new folder of dcc/ missing
from it would silently be left out of an installed dcc: every package under dcc/ and every kernel family under
csrc/ must be listed."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_and_kernel_family_ships():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dcc").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    families = {f"dcc._csrc.{p.name}" for p in (ROOT / "csrc").iterdir() if p.is_dir()}
    assert families <= listed and set(cfg["package-data"]) >= families
    assert cfg["package-dir"]["dcc._csrc"] == "csrc"
