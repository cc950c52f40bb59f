"""Tiny causal-LM artifacts for the diff and report tests (tests/cli/test_cli_diff.py, test_cli_report.py,
tests/runtime/test_diff.py, test_report_data.py): a 2-block Llama (hidden 64, vocab 100, no tokenizer) compiled by
`dcc compile` with a few recipes, pass dumps on request."""
from __future__ import annotations

from pathlib import Path

from cli_util import run
from tiny_models import decoder_config, save_tiny

RECIPES = {
    "rtn": ("--algo", "rtn", "--group-size", "64"),
    "awq": ("--algo", "awq", "--group-size", "64"),
    "qserve": ("--target", "qserve"),
    "nunchaku": ("--target", "nunchaku", "--rank", "16"),
}


def tiny_lm(d: Path, hidden: int = 64) -> tuple[Path, Path, Path]:
    """(model folder, calibration ids, evaluation ids) under d."""
    save_tiny(d / "m", decoder_config("llama", hidden=hidden))
    (d / "calib.txt").write_text(" ".join(str((7 * i + 3) % 100) for i in range(4 * 32)))
    (d / "eval.txt").write_text(" ".join(str((11 * i + 5) % 100) for i in range(4 * 32)))
    return d / "m", d / "calib.txt", d / "eval.txt"


def compile_tiny(model: Path, calib: Path, out: Path, recipe: str, dump_dir: Path | None = None) -> Path:
    extra = ("--dump-dir", dump_dir) if dump_dir is not None else ()
    code, text = run("compile", model, *RECIPES[recipe], "--calib", calib, "--calib-chunks", "2", "--calib-seq-len",
                     "32", "-o", out, "-q", *extra)
    assert code == 0, text
    return out
