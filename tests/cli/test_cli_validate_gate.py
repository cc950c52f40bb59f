"""`dcc validate` as a CI gate, on a tiny random Llama (11 blocks, 64 wide) that carries SmolLM2's real tokenizer, so
that --text measures real text (a slice of WikiText-2): exit codes 0 / 1 / 2, the failure lines, --json, --junit
(parsed), the [checks] file, the random-token fallback's label, the summary vs --layers, progress bars; `dcc inspect`
in natural order and `dcc eval --ppl`'s estimate of its run."""
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cli_util import error_line, run
from tiny_models import decoder_config, save_tiny

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
TOKENIZER = ASSETS / "smollm2_tokenizer"
WIKI = ASSETS / "wikitext2_raw_test" / "wiki.test.raw"
pytestmark = pytest.mark.skipif(not (TOKENIZER.is_dir() and WIKI.is_file()),
                                reason=f"needs ../shared/assets ({TOKENIZER}, {WIKI})")
BLOCKS = 11   # layers.10 exists, so natural order differs from the alphabetical one
RANDOM = "random token ids (no --text given)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, artifact folder, a real text): rtn 4-bit, group 64, calibrated on the same text."""
    d = tmp_path_factory.mktemp("gate")
    model = d / "m"
    save_tiny(model, decoder_config("llama", vocab=49152, layers=BLOCKS))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, model / f)
    text = d / "wiki.txt"
    text.write_text(WIKI.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    code, out = run("compile", model, "--algo", "rtn", "--group-size", "64", "--calib", text, "--calib-chunks", "2",
                    "--calib-seq-len", "32", "-o", d / "art", "-q")
    assert code == 0, out
    return model, d / "art", text


def quantized(art) -> list[str]:
    return [k for k, v in json.loads((art / "dcc.json").read_text())["layers"].items() if "skip_reason" not in v]


def test_no_thresholds_passes_and_labels_random_ids(tiny, tmp_path):
    model, art, _ = tiny
    code, out = run("validate", art, "--model", model, "--tokens", "32", "--json", tmp_path / "v.json",
                    "--junit", tmp_path / "v.xml", "-q")
    assert code == 0, out
    assert f"compared on {RANDOM}" in out and "checks: 1 passed, 0 failed" in out
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["passed"] is True and rep["inputs"]["source"] == RANDOM
    n = len(quantized(art))
    assert [c["name"] for c in rep["checks"]] == [f"decoded weights equal compiled ({n}/{n} layers)"]
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "v.xml").getroot().iter("property")}
    assert RANDOM in props["inputs"] and props["target"] == "tinychat"


def test_summary_lists_the_worst_layers_and_layers_lists_all(tiny):
    model, art, _ = tiny
    code, out = run("validate", art, "--model", model, "--tokens", "32", "-q")
    assert code == 0, out
    rows = re.findall(r"^  (model\.layers\.\d+\.\S+) +(\S+)$", out, re.M)
    assert len(rows) == 10
    errs = [float(e) for _, e in rows]
    assert errs == sorted(errs, reverse=True)
    code, full = run("validate", art, "--model", model, "--tokens", "32", "--layers", "-q")
    assert code == 0, full
    table = re.findall(r"^(model\.layers\.(\d+)\.\S+) +\S+$", full, re.M)
    assert {name for name, _ in table} >= set(quantized(art))
    blocks = [int(b) for _, b in table]
    assert blocks == sorted(blocks) and blocks[-1] == BLOCKS - 1   # natural order: layers.2 before layers.10


def test_text_metrics_loose_thresholds_pass(tiny, tmp_path):
    model, art, text = tiny
    code, out = run("validate", art, "--model", model, "--text", text, "--tokens", "32", "--windows", "3",
                    "--max-layer-error", "10", "--max-kl", "100", "--min-top1", "0", "--max-ppl-increase", "100",
                    "--json", tmp_path / "v.json", "-q")
    assert code == 0, out
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["inputs"]["source"] == "text" and rep["inputs"]["windows"] == 3
    assert rep["inputs"]["tokens_per_window"] == 32 and rep["inputs"]["windows_in_file"] > 3
    f = rep["float"]
    assert f["ppl_tokens"] == 3 * 31
    assert f["ppl_artifact"] / f["ppl_float"] - 1 == pytest.approx(f["ppl_increase"])
    assert 0 < f["kl"] and 0 <= f["top1_agreement"] <= 1
    assert RANDOM not in out and "perplexity on the text: float" in out
    n = len(quantized(art))
    assert len(rep["checks"]) == 1 + n + 3 and all(c["passed"] for c in rep["checks"])
    kl = next(c for c in rep["checks"] if c["name"].startswith("logits KL"))
    assert kl["measured"] == f["kl"] and kl["allowed"] == 100


def test_strict_layer_threshold_fails_naming_each_layer(tiny, tmp_path):
    model, art, _ = tiny
    code, out = run("validate", art, "--model", model, "--tokens", "32", "--max-layer-error", "1e-9",
                    "--junit", tmp_path / "v.xml", "--json", tmp_path / "v.json", "-q")
    assert code == 1, out
    names = quantized(art)
    failed = re.findall(r"^FAILED: layer (\S+) output_rel_err: measured (\S+), allowed <= 1e-09$", out, re.M)
    assert {n for n, _ in failed} == set(names) and all(float(m) > 1e-9 for _, m in failed)
    assert f"{len(names)} of {len(names) + 1} checks failed" in error_line(out)
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False
    root = ET.parse(tmp_path / "v.xml").getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == len(names) + 1
    assert int(suite.get("failures")) == len(names)
    failing = [c for c in cases if c.find("failure") is not None]
    assert {c.get("name") for c in failing} == {f"layer {n} output_rel_err" for n in names}
    assert all("allowed <= 1e-09" in c.find("failure").get("message") for c in failing)
    assert cases[0].find("failure") is None and cases[0].get("name").startswith("decoded weights equal compiled")


def test_strict_top1_fails_with_one_line(tiny):
    model, art, text = tiny
    # 4-bit rtn of a random 64-wide model cannot agree with the float model on every token of real text
    code, out = run("validate", art, "--model", model, "--text", text, "--tokens", "32", "--min-top1", "1", "-q")
    assert code == 1, out
    (line,) = [x for x in out.splitlines() if x.startswith("FAILED")]
    assert line.startswith("FAILED: top-1 agreement with the float model: measured 0.") and "allowed >= 1" in line


def test_checks_file_and_flags_override(tiny, tmp_path):
    model, art, _ = tiny
    cfg = tmp_path / "gate.toml"
    cfg.write_text("[checks]\nmax_layer_error = 1e-9\nmax_kl = 100\n")
    code, out = run("validate", art, "--model", model, "--tokens", "32", "--checks", cfg, "-q")
    assert code == 1 and "FAILED: layer model.layers.0." in out, out
    code, out = run("validate", art, "--model", model, "--tokens", "32", "--checks", cfg, "--max-layer-error", "10",
                    "-q")
    assert code == 0 and "FAILED" not in out, out
    assert f"checks: {len(quantized(art)) + 2} passed, 0 failed" in out


@pytest.mark.parametrize("args, says", [
    (["--max-kl", "0.1"], "--max-kl compares the artifact with the float model: give --model"),
    (["--max-layer-error", "0.1"], "--max-layer-error compares the artifact with the float model: give --model"),
    (["--text", "TEXT"], "--text compares the artifact with the float model on a text: give --model"),
    (["--model", "MODEL", "--max-ppl-increase", "0.05"], "--max-ppl-increase measures perplexity on real text: "
                                                         "give --text FILE"),
    (["--min-top1", "1.5"], "Invalid value for '--min-top1'"),
])
def test_bad_input_exits_2(tiny, args, says):
    model, art, text = tiny
    args = [{"TEXT": text, "MODEL": model}.get(a, a) for a in args]
    code, out = run("validate", art, *args, "-q")
    assert code == 2 and says in out, out


def test_checks_file_errors_exit_2(tiny, tmp_path):
    model, art, _ = tiny
    cfg = tmp_path / "gate.toml"
    cfg.write_text("[checks]\nmax_layer_eror = 0.1\n")
    code, out = run("validate", art, "--model", model, "--checks", cfg, "-q")
    assert code == 2 and error_line(out) == (f"dcc: error: {cfg}: unknown key 'max_layer_eror' in [checks] (known: "
                                             f"max_layer_error, max_kl, min_top1, max_ppl_increase)")
    cfg.write_text("[checks]\nmax_kl = 'small'\n")
    code, out = run("validate", art, "--model", model, "--checks", cfg, "-q")
    assert code == 2 and f"{cfg}: [checks] max_kl must be a number" in error_line(out)


def test_progress_bars_unless_quiet(tiny):
    model, art, _ = tiny
    code, out = run("validate", art, "--model", model, "--tokens", "32")
    assert code == 0, out
    assert re.search(r"decoding layers: .*layer/s", out) and re.search(r"float model: .*block/s", out), out
    assert re.search(r"artifact: .*block/s", out), out
    code, out = run("validate", art, "--model", model, "--tokens", "32", "-q")
    assert code == 0 and "layer/s" not in out and "block/s" not in out, out


def test_inspect_lists_layers_in_natural_order(tiny):
    _, art, _ = tiny
    code, out = run("inspect", art)
    assert code == 0, out
    assert out.splitlines()[0].startswith(f"{art}: target tinychat")
    rows = re.findall(r"^(model\.layers\.(\d+)\.\S+) ", out, re.M)
    assert len(rows) == 7 * BLOCKS
    blocks = [int(b) for _, b in rows]
    assert blocks == sorted(blocks) and blocks.index(10) > blocks.index(2)


def test_eval_without_windows_says_how_long(tiny):
    model, art, text = tiny
    code, out = run("eval", art, "--ppl", text, "--seq-len", "32", "-q")
    assert code == 0, out
    m = re.search(r"perplexity: (\d+) windows x 32 tokens, about \S+ min at \S+ s/window on this machine", out)
    assert m and int(m.group(1)) > 1, out
    assert out.index(m.group(0)) < out.index("artifact  perplexity")
    code, out = run("eval", art, "--ppl", text, "--seq-len", "32", "--windows", "2", "-q")
    assert code == 0 and "s/window" not in out, out


def test_decoded_weights_that_differ_fail_the_gate(tiny, tmp_path):
    """A manifest whose recorded checksum of one layer's fake-quant weight differs: exit 1, and the exactness check
    fails in the JUnit file (the layer is named on the error line)."""
    _, art, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    m = json.loads((bad / "dcc.json").read_text())
    layer = quantized(bad)[3]
    m["layers"][layer]["weight_sha256"] = "0" * 64
    (bad / "dcc.json").write_text(json.dumps(m))
    code, out = run("validate", bad, "--junit", tmp_path / "v.xml", "-q")
    n = len(quantized(bad))
    assert code == 1 and f"decoded weights equal the fake-quant weights: {n - 1}/{n} layers" in out, out
    assert error_line(out) == (f"dcc: error: 1 layers decode to weights that differ from the compiled ones, "
                               f"first: {layer}")
    (case,) = ET.parse(tmp_path / "v.xml").getroot().iter("testcase")
    assert case.get("name") == f"decoded weights equal compiled ({n - 1}/{n} layers)"
    assert "measured 1 layers differing, allowed <= 0" in case.find("failure").get("message")
