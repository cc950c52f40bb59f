"""`dcc diff A B` on two tiny artifacts of one model (RTN and AWQ recipes): the recipe difference and per-layer
deltas it prints, exit 1 when a strict --max-layer-error-increase fails and 0 when loose, exit 2 for artifacts of
different models and other bad input, and the JSON and JUnit files."""
import json
import xml.etree.ElementTree as ET

import pytest

from cli_util import error_line, run
from tiny_lm_artifacts import compile_tiny, tiny_lm
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    model, calib, text = tiny_lm(d)
    return {"rtn": compile_tiny(model, calib, d / "rtn", "rtn"), "awq": compile_tiny(model, calib, d / "awq", "awq"),
            "model": model, "calib": calib, "text": text, "dir": d}


def _errs(path):
    m = json.loads((path / "dcc.json").read_text())
    return {k: v["output_rel_err"] for k, v in m["layers"].items() if "output_rel_err" in v}


def test_prints_recipe_and_layer_deltas(arts):
    code, out = run("diff", arts["rtn"], arts["awq"], "--layers")
    assert code == 0, out
    assert 'passes: "rtn" -> "awq -> clip -> rtn"' in out
    assert 'recipe.algo: "rtn" -> "awq"' in out
    ea, eb = _errs(arts["rtn"]), _errs(arts["awq"])
    for name in ea:   # every common layer, with its delta B minus A as printed
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert float(line.split()[-1]) == pytest.approx(eb[name] - ea[name], rel=1e-2, abs=1e-5)
    assert "better: " in out and "checks:" not in out


def test_strict_threshold_fails_with_json_and_junit(arts, tmp_path):
    ea, eb = _errs(arts["rtn"]), _errs(arts["awq"])
    worse = {k for k in ea if ea[k] > eb[k]}      # RTN's error above AWQ's: B = rtn is worse there
    assert worse, "the tiny model should give AWQ a lower error on some layer"
    code, out = run("diff", arts["awq"], arts["rtn"], "--max-layer-error-increase", "0", "--json",
                    tmp_path / "d.json", "--junit", tmp_path / "d.xml")
    assert code == 1, out
    assert "checks failed" in error_line(out)
    failed_lines = [x for x in out.splitlines() if x.startswith("FAILED: layer ")]
    assert {x.split()[2] for x in failed_lines} == worse
    r = json.loads((tmp_path / "d.json").read_text())
    assert r["passed"] is False and len(r["checks"]) == len(ea)
    assert {c["name"].split()[1] for c in r["checks"] if not c["passed"]} == worse
    assert {x["key"] for x in r["recipe"]} >= {"recipe.algo", "passes"}
    suite = ET.parse(tmp_path / "d.xml").getroot().find("testsuite")
    assert suite.get("name") == "dcc diff" and int(suite.get("tests")) == len(ea)
    assert int(suite.get("failures")) == len(worse)
    failing = {tc.get("name").split()[1] for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert failing == worse


def test_loose_threshold_passes(arts, tmp_path):
    code, out = run("diff", arts["awq"], arts["rtn"], "--max-layer-error-increase", "100", "--junit",
                    tmp_path / "d.xml", "--json", tmp_path / "d.json")
    assert code == 0, out
    assert f"checks: {len(_errs(arts['rtn']))} passed, 0 failed" in out
    suite = ET.parse(tmp_path / "d.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and not list(suite.iter("failure"))
    assert json.loads((tmp_path / "d.json").read_text())["passed"] is True


def test_text_perplexity_decides(arts, tmp_path):
    code, out = run("diff", arts["rtn"], arts["awq"], "--text", arts["text"], "--model", arts["model"],
                    "--seq-len", "32", "--windows", "2", "--json", tmp_path / "d.json", "-q")
    assert code == 0, out
    r = json.loads((tmp_path / "d.json").read_text())
    p = r["perplexity"]
    assert p["a"]["windows"] == p["b"]["windows"] == 2 and p["a"]["ppl"] != p["b"]["ppl"]
    assert r["summary"]["basis"] == "perplexity"
    assert r["summary"]["better"] == ("a" if p["a"]["ppl"] < p["b"]["ppl"] else "b")
    assert "source" in p and "better: " + r["summary"]["better"].upper() in out


def test_different_models_exit_2(arts, tmp_path):
    save_tiny(tmp_path / "wide", decoder_config("llama", hidden=128))
    other = compile_tiny(tmp_path / "wide", arts["calib"], tmp_path / "wide_rtn", "rtn")
    code, out = run("diff", arts["rtn"], other, "--max-layer-error-increase", "0.1")
    assert code == 2
    assert "not of the same model (hidden_size 64 vs 128)" in error_line(out)


def test_bad_input_exit_2(arts, tmp_path):
    code, out = run("diff", arts["rtn"], tmp_path / "nowhere")
    assert code == 2 and "not an artifact folder" in error_line(out)
    code, out = run("diff", arts["rtn"], arts["awq"], "--model", arts["model"])
    assert code == 2 and "--model goes with --text" in error_line(out)
    code, out = run("diff", arts["rtn"], arts["awq"], "--junit", tmp_path / "no" / "d.xml")
    assert code == 2 and "its folder does not exist" in error_line(out)
