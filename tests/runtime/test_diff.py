"""dcc/runtime/diff.py: recipe, size and per-layer differences of two artifacts (B minus A), which is better, the
per-layer increase checks, and the refusal of artifacts of different models -- on synthetic manifests (exact
numbers) and on two tiny artifacts compiled with different recipes."""
import math

import pytest

from dcc.runtime.artifact import Artifact, load_artifact
from dcc.runtime.diff import (DiffError, check_same_source, diff, layer_checks, layer_diff, recipe_diff,
                              relative_increase, size_diff, summary)

from tiny_lm_artifacts import compile_tiny, tiny_lm
from tiny_models import one_thread  # noqa: F401  (autouse fixture)

SPEC = {"dtype": "int4", "group_size": 64}


def manifest(algo="rtn", passes=("rtn",), layers=None, hidden=64, **recipe):
    layers = layers if layers is not None else {
        "model.layers.0.mlp.down_proj": {"format": "f", "spec": SPEC, "weight_sqnr_db": 20.0, "output_rel_err": 0.1},
        "model.layers.10.mlp.down_proj": {"format": "f", "spec": SPEC, "weight_sqnr_db": 21.0,
                                          "output_rel_err": 0.2},
        "model.layers.2.mlp.down_proj": {"format": "f", "spec": SPEC, "weight_sqnr_db": 22.0, "output_rel_err": 0.3},
    }
    return {"target": "t", "engines": ["dcc-runtime"], "dtype": "float16", "files": {},
            "source": {"architecture": "LlamaForCausalLM", "kind": "causal-lm", "num_blocks": 2,
                       "blocks": "model.layers"},
            "recipe": {"algo": algo, "seed": 0, "options": {"algo": algo, "group_size": 64},
                       "calibration": {"file": "c.txt", "chunks": 2, "seq_len": 32},
                       "pipeline": [{"pass": p, "config": {}} for p in passes], **recipe},
            "versions": {"dcc": "0.1.0"}, "layers": layers}


def art(tmp_path, name, m, hidden=64, files=None):
    d = tmp_path / name
    d.mkdir()
    for f, size in (files or {}).items():
        (d / f).write_bytes(b"x" * size)
    m = {**m, "files": {f: "-" for f in files or {}}}
    return Artifact(d, m, {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": 2}, None)


def test_recipe_diff_names_what_changed():
    a, b = manifest(), manifest("awq", ("awq", "clip", "rtn"))
    b["recipe"]["pipeline"][1]["config"] = {"grid": 20}
    rows = {r["key"]: (r["a"], r["b"]) for r in recipe_diff(a, b)}
    assert rows["recipe.algo"] == ("rtn", "awq")
    assert rows["passes"] == ("rtn", "awq -> clip -> rtn")
    assert rows["pass.clip.grid"] == (None, 20)
    assert "recipe.calibration.chunks" not in rows and "recipe.seed" not in rows
    assert recipe_diff(a, manifest()) == []


def test_layer_deltas_are_b_minus_a_and_one_sided_layers_are_listed():
    la = manifest()["layers"]
    lb = {k: {**v, "output_rel_err": v["output_rel_err"] * 2, "weight_sqnr_db": v["weight_sqnr_db"] - 1}
          for k, v in la.items() if "layers.2." not in k}
    lb["model.layers.1.mlp.up_proj"] = {"skip_reason": "shape"}
    lb["model.layers.0.mlp.down_proj"] = {"skip_reason": "kept"}   # 16-bit in B: no error to compare
    d = layer_diff({"layers": la}, {"layers": lb})
    assert list(d["common"]) == ["model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj"]
    r = d["common"]["model.layers.10.mlp.down_proj"]
    assert r["err_delta"] == pytest.approx(0.2) and r["sqnr_delta"] == pytest.approx(-1.0)
    kept = d["common"]["model.layers.0.mlp.down_proj"]
    assert kept["format_b"] == "16-bit" and kept["err_b"] is None and kept["err_delta"] is None
    assert d["only_a"] == ["model.layers.2.mlp.down_proj"] and d["only_b"] == ["model.layers.1.mlp.up_proj"]


def test_layer_checks_are_relative_increases():
    la = manifest()["layers"]
    lb = {k: dict(v) for k, v in la.items()}
    lb["model.layers.2.mlp.down_proj"]["output_rel_err"] = 0.33   # 10 % worse
    lb["model.layers.0.mlp.down_proj"]["output_rel_err"] = 0.05   # better
    d = layer_diff({"layers": la}, {"layers": lb})
    strict = {c.name: c for c in layer_checks(d, 0.05)}
    assert len(strict) == 3
    bad = strict["layer model.layers.2.mlp.down_proj output_rel_err increase"]
    assert not bad.passed and bad.measured == pytest.approx(0.1)
    assert [c.name for c in strict.values() if not c.passed] == [bad.name]
    assert all(c.passed for c in layer_checks(d, 0.2))
    assert relative_increase(0.0, 0.0) == 0.0 and math.isinf(relative_increase(0.0, 0.1))


def test_summary_prefers_perplexity_when_measured():
    la = manifest()["layers"]
    lb = {k: {**v, "output_rel_err": v["output_rel_err"] / 2} for k, v in la.items()}
    d = layer_diff({"layers": la}, {"layers": lb})
    s = summary(d)
    assert s["better"] == "b" and s["basis"] == "mean layer output_rel_err" and s["better_layers"] == 3
    assert s["mean_err_a"] == pytest.approx(0.2) and s["mean_err_b"] == pytest.approx(0.1)
    s = summary(d, {"a": {"ppl": 10.0}, "b": {"ppl": 11.0}})
    assert s["better"] == "a" and s["basis"] == "perplexity"


def test_sizes_per_file_and_total(tmp_path):
    a = art(tmp_path, "a", manifest(), files={"model.safetensors": 100, "config.json": 10})
    b = art(tmp_path, "b", manifest(), files={"model.safetensors": 130, "extra.bin": 5})
    s = size_diff(a, b)
    assert s["files"]["model.safetensors"] == {"a": 100, "b": 130, "delta": 30}
    assert s["files"]["config.json"]["b"] is None and s["files"]["extra.bin"]["a"] is None
    assert s["total"] == {"a": 110, "b": 135, "delta": 25}


def test_refuses_different_models(tmp_path):
    a = art(tmp_path, "a", manifest())
    with pytest.raises(DiffError, match="hidden_size 64 vs 128"):
        check_same_source(a, art(tmp_path, "b", manifest(), hidden=128))
    other = manifest()
    other["source"] = {**other["source"], "architecture": "Qwen2ForCausalLM"}
    with pytest.raises(DiffError, match="architecture"):
        check_same_source(a, art(tmp_path, "c", other))
    check_same_source(a, art(tmp_path, "d", manifest("awq")))   # same model, other recipe: fine


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    model, calib, _ = tiny_lm(d)
    return (load_artifact(compile_tiny(model, calib, d / "rtn", "rtn")),
            load_artifact(compile_tiny(model, calib, d / "awq", "awq")))


def test_real_artifacts(pair):
    rtn, awq = pair
    res = diff(rtn, awq, max_increase=0.0)
    keys = {r["key"] for r in res["recipe"]}
    assert {"recipe.algo", "passes"} <= keys
    common = res["layers"]["common"]
    assert set(common) == set(rtn.quantized_layers()) and not res["layers"]["only_a"]
    for name, r in common.items():
        assert r["err_delta"] == pytest.approx(awq.manifest["layers"][name]["output_rel_err"]
                                               - rtn.manifest["layers"][name]["output_rel_err"])
    assert len(res["checks"]) == len(common)
    # the strict check fails exactly where AWQ's layer error is above RTN's
    assert {c.name for c in res["checks"] if not c.passed} == {
        f"layer {n} output_rel_err increase" for n, r in common.items() if r["err_b"] > r["err_a"]}
    assert res["sizes"]["total"]["a"] > 0
