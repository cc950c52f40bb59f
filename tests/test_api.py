"""The Python API (dcc.compile, dcc.load) and recipes: the manifest's recipe section reproduces its artifact byte
for byte through `dcc compile --recipe ARTIFACT/dcc.json`, and a recipe file sets target, options and passes."""
import json

import pytest
from click.testing import CliRunner

import dcc
from dcc.cli.main import main
from tiny_models import decoder_config, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    save_tiny(d / "m", decoder_config("llama"))
    (d / "ids.txt").write_text(" ".join(str((11 * i) % 100) for i in range(512)))
    return d / "m", d / "ids.txt"


def test_compile_and_load(tiny, tmp_path):
    model, ids = tiny
    out = dcc.compile(model, target="qserve", output=tmp_path / "a", calibration=ids, algo="rtn", calib_chunks=2,
                      calib_seq_len=32, progress=False)
    art = dcc.load(out)
    assert art.manifest["target"] == "qserve" and art.manifest["recipe"]["options"]["algo"] == "rtn"
    w = art.decode("model.layers.0.self_attn.q_proj")
    assert tuple(w.shape) == (64, 64)
    with pytest.raises(ValueError, match="zero"):
        dcc.compile(model, target="qserve", output=tmp_path / "b", calibration=ids, zero="float")
    with pytest.raises(ValueError, match="unknown option 'group'"):
        dcc.compile(model, output=tmp_path / "b", calibration=ids, group=64)
    assert not (tmp_path / "b").exists()


def test_the_manifest_recipe_reproduces_the_artifact(tiny, tmp_path):
    model, ids = tiny
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(model), "--target", "qserve", "--algo", "qoq-rtn", "--group-size",
                               "64", "--calib", str(ids), "--calib-chunks", "3", "--calib-seq-len", "48", "--seed",
                               "5", "-o", str(tmp_path / "a"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["compile", str(model), "--recipe", str(tmp_path / "a" / "dcc.json"), "--calib",
                               str(ids), "-o", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    for f in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_recipe_file_sets_target_options_and_passes(tiny, tmp_path):
    model, ids = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: tinychat\noptions: {group_size: 64, zero: integer}\n"
                      "passes:\n  - {pass: clip, config: {grid: 4}}\n  - {pass: rtn}\ncalibration: {chunks: 2, "
                      "seq_len: 32}\n")
    out = dcc.compile(model, output=tmp_path / "a", calibration=ids, recipe=recipe, progress=False)
    m = json.loads((out / "dcc.json").read_text())
    r = m["recipe"]
    assert m["target"] == "tinychat" and r["options"]["group_size"] == 64 and r["weight"]["zero_mode"] == "scaled"
    assert [s["pass"] for s in r["pipeline"]] == ["clip", "rtn"] and r["algo"] == "recipe r.yaml"
    assert (r["calibration"]["chunks"], r["calibration"]["seq_len"]) == (2, 32)
    with pytest.raises(ValueError, match="recipe .* is for target tinychat"):
        dcc.compile(model, target="qserve", output=tmp_path / "b", calibration=ids, recipe=recipe)
    recipe.write_text("seed: 3\n")
    with pytest.raises(ValueError, match="names no target, options or passes"):
        dcc.compile(model, output=tmp_path / "c", calibration=ids, recipe=recipe)
