"""Tiny causal-LM artifacts for the diff and report tests (tests/cli/test_cli_diff.py, test_cli_report.py,
tests/runtime/test_diff.py, test_report_data.py): a 2-block Llama (hidden 64, vocab 100, no tokenizer) compiled by
`dcc compile` with a few recipes, pass dumps on request; and QServe artifacts the engine runs (W4A8 per channel and
W8A8) for the engine-fidelity tests (tests/targets/qserve/test_engine_fused_quant.py, its GPU twin)."""
from __future__ import annotations

from pathlib import Path

import torch

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


def qserve_engine_artifacts(tmp_path_factory) -> dict:
    """{4: W4A8 per-channel (qoq-rtn), 8: W8A8 (smoothquant)} artifact folders of a 2-layer Llama (hidden 128, 4/2
    heads, intermediate 256) that QServe's engine runs (their manifests list it)."""
    from dcc.api import CompileOptions, compile_model

    d = tmp_path_factory.mktemp("tiny") / "llama"
    cfg = decoder_config("llama", hidden=128, heads=4, kv_heads=2, head_dim=32, layers=2, intermediate_size=256)
    save_tiny(d, cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (4 * 64,), generator=torch.Generator().manual_seed(0))
    (d.parent / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    out = {}
    for bits, algo in ((4, "qoq-rtn"), (8, "smoothquant")):
        opts = CompileOptions(target="qserve", algo=algo, bits=bits, group_size=0, calib=str(d.parent / "calib.txt"),
                              calib_chunks=4, calib_seq_len=64, progress=False)
        out[bits] = compile_model(str(d), str(tmp_path_factory.mktemp("arts") / algo), opts, log=lambda m: None)
    return out
