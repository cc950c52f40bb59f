"""End to end on the embedded default model, SmolLM2-135M-Instruct (GGUF): compile from the .gguf, validate that the
artifact decodes to the compiled weights, and measure its perplexity on real text against the float model."""
import json
import os
from pathlib import Path

import pytest

from cli_util import run

GGUF = Path(os.environ.get("DCC_SMOLLM2_GGUF", "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
PTB, WIKI = ASSETS / "ptb" / "ptb.valid.txt", ASSETS / "wikitext2_raw_test" / "wiki.test.raw"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason=f"the default model {GGUF} is absent (scripts/setup.sh fetches it)"),
    pytest.mark.skipif(not PTB.is_file(), reason=f"needs ../shared/assets ({PTB} is absent)"),
]


def test_smollm2_compile_validate_eval(tmp_path):
    out = tmp_path / "smol"
    code, text = run("compile", GGUF, "--algo", "rtn", "--group-size", "64", "--calib", PTB, "--calib-chunks", "4",
                     "--calib-seq-len", "128", "-o", out, "-q")
    assert code == 0, text
    m = json.loads((out / "dcc.json").read_text())
    assert m["source"]["num_blocks"] == 30 and len(m["layers"]) == 30 * 7
    assert all("skip_reason" not in v for v in m["layers"].values())   # g64 takes every 576/1536-wide layer
    assert (out / "tokenizer.json").is_file()

    code, text = run("validate", out)
    assert code == 0 and "210/210 layers" in text, text

    js = tmp_path / "ppl.json"
    code, text = run("eval", out, "--ppl", WIKI, "--windows", "2", "--seq-len", "256", "--baseline", GGUF,
                     "--json", js, "-q")
    assert code == 0, text
    r = json.loads(js.read_text())
    base, art = r["baseline"]["ppl"], r["artifact"]["ppl"]
    assert base < art < 2 * base, (base, art)   # 4-bit costs a little on this model; a broken decode costs x100


def test_smollm2_group_128_stops_and_names_a_576_wide_layer(tmp_path):
    code, text = run("compile", GGUF, "--calib", PTB, "-o", tmp_path / "x", "-q")
    assert code == 2
    line = [x for x in text.splitlines() if x.startswith("dcc: error:")][0]
    assert "model.layers.0.self_attn.q_proj" in line and "576" in line and "--group-size 64" in line


def test_smollm2_qserve_w4a8kv4_per_channel(tmp_path):
    """The QServe target on the real model: per channel (576 = 18 x 32 packs; 128 does not divide it), every layer
    quantized, QServe's loader keys present, decoded == compiled, and the artifact's own W4A8KV4 perplexity."""
    out = tmp_path / "qs"
    code, text = run("compile", GGUF, "--target", "qserve", "--algo", "qoq-rtn", "--calib", PTB, "--calib-chunks",
                     "4", "--calib-seq-len", "128", "-o", out, "-q")
    assert code == 0, text
    m = json.loads((out / "dcc.json").read_text())
    assert m["engines"] == ["qserve", "dcc-runtime"] and len(m["layers"]) == 210
    assert {v["format"] for v in m["layers"].values()} == {"qserve-w4a8-per-channel"}
    code, text = run("validate", out)
    assert code == 0 and "210/210 layers" in text and "QServe's loader: every tensor" in text, text
    js = tmp_path / "ppl.json"
    code, text = run("eval", out, "--ppl", WIKI, "--windows", "2", "--seq-len", "256", "--baseline", GGUF,
                     "--json", js, "-q")
    assert code == 0, text
    r = json.loads(js.read_text())
    base, art = r["baseline"]["ppl"], r["artifact"]["ppl"]
    assert base < art < 2 * base, (base, art)


def test_smollm2_qserve_g128_names_a_576_wide_layer(tmp_path):
    code, text = run("compile", GGUF, "--target", "qserve", "--group-size", "128", "--calib", PTB, "-o",
                     tmp_path / "x", "-q")
    assert code == 2
    line = [x for x in text.splitlines() if x.startswith("dcc: error:")][0]
    assert "model.layers.0.self_attn.q_proj" in line and "576" in line and "128" in line
