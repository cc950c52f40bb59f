"""dcc/runtime/report_data.py, report_dumps.py and layer_names.py: what `dcc report` gathers from tiny artifacts of
three targets and their pass dumps -- every layer placed by block and kind, the true number of scales (padding left
out), low-rank energy recomputed here from the unpacked tensors, per-pass times, clip ratios and smoothing factors
from the dumps -- and the template shipping as package data."""
import fnmatch
import json
import tomllib
from pathlib import Path

import pytest

from dcc.runtime.artifact import load_artifact
from dcc.runtime.layer_names import natural_key, placer
from dcc.runtime.report_data import gather
from dcc.runtime.report_dumps import looks_like_dumps, read_dumps

from tiny_lm_artifacts import compile_tiny, tiny_lm
from tiny_models import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    model, calib, _ = tiny_lm(d)
    return {r: (compile_tiny(model, calib, d / r, r, d / f"dump_{r}"), d / f"dump_{r}")
            for r in ("awq", "qserve", "nunchaku")}


def test_natural_order_and_block_placement():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj", "lm_head"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.2.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    flux = {"source": {"block_lists": ["transformer_blocks", "single_transformer_blocks"]}}
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
              "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.2.proj_out", "proj_out"]
    place = placer(flux, layers)
    assert [place(n).block for n in layers] == [0, 1, 2, 4, None]   # single blocks numbered after the double ones
    assert place("single_transformer_blocks.2.proj_out").kind == "proj_out"
    assert place("single_transformer_blocks.2.proj_out").prefix == "single_transformer_blocks.2"


@pytest.mark.parametrize("recipe", ["awq", "qserve", "nunchaku"])
def test_every_layer_and_true_scale_count(arts, recipe):
    art = load_artifact(arts[recipe][0])
    data = gather(art)
    m = art.manifest
    assert [r["name"] for r in data["layers"]] == sorted(m["layers"], key=natural_key)
    for r in data["layers"]:
        assert r["prefix"] == ".".join(r["name"].split(".")[:3]) and r["block"] == int(r["name"].split(".")[2])
        assert r["err"] == m["layers"][r["name"]].get("output_rel_err")
    # one scale per group (per channel where group_size is 0), whatever padding the layout stores
    expect = 0
    for e in art.quantized_layers().values():
        n, k = e["shape"]
        g = e["spec"]["group_size"]
        expect += n * (k // g if g else 1)
    assert data["scales"]["total"] == expect
    assert sum(v.size for v in data["scales"]["log2"].values()) <= expect
    kinds = data["err_by_kind"]
    assert set(kinds) == {r["kind"] for r in data["layers"] if r["err"] is not None}
    assert all([b for b, _ in pts] == [0, 1] for pts in kinds.values())


def test_lowrank_energy_and_smoothing(arts):
    from dcc.targets.nunchaku.emit import unpack_linear
    from dcc.targets.nunchaku.reference import decode_int4_weight
    art = load_artifact(arts["nunchaku"][0])
    rows = {r["name"]: r for r in gather(art)["layers"]}
    for name, e in art.quantized_layers().items():
        n, k = e["shape"]
        t = unpack_linear({x: art.tensors.get(f"{name}.{x}") for x in
                           ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias")}, n, k)
        s = t["smooth"].double()
        low = t["lora_up"].double() @ (t["lora_down"].double() * s)        # the branch in the smoothed basis
        w = decode_int4_weight(t["codes"], t["scales"]).double() + low
        assert rows[name]["lowrank_energy"] == pytest.approx(float(low.pow(2).sum() / w.pow(2).sum()), rel=1e-3)
        assert 0 < rows[name]["lowrank_energy"] < 1
        assert rows[name]["smooth_max"] == pytest.approx(float(s.abs().max()), rel=1e-3)
    assert all(r["lowrank_energy"] is None for r in gather(load_artifact(arts["awq"][0]))["layers"])


def test_dumps_give_times_clip_and_smoothing(arts):
    art_path, dump = arts["qserve"]
    assert looks_like_dumps(dump) and not looks_like_dumps(art_path)
    d = read_dumps(dump)
    files = sorted(dump.glob("model.layers.*/*.json"))
    expect: dict[str, float] = {}
    for f in files:
        rec = json.loads(f.read_text())
        s = ((rec.get("result") or {}).get("details") or {}).get("seconds")
        if s is not None:
            expect[rec["pass"]] = expect.get(rec["pass"], 0.0) + s
    assert d.seconds == pytest.approx(expect) and "gptq" in d.seconds
    data = gather(load_artifact(art_path), d)
    assert data["times"]["source"] == "dumps"
    clipped = {r["name"] for r in data["layers"] if r["clip"] is not None}
    assert clipped and all(0.3 < r["clip"] <= 1.0 for r in data["layers"] if r["clip"] is not None)
    assert not any(n.endswith(("q_proj", "k_proj")) for n in clipped)   # clip skips q and k (skip_qk)
    groups = data["smooth_groups"]
    assert {g["pass"] for g in groups} == {"smooth", "smooth_attention"}
    assert all(0 < g["min"] <= g["max"] and g["index"] in (0, 1) for g in groups)
    assert "times" not in data["notes"] and "smooth" in data["notes"]   # QServe folds the factors: said so


def test_no_dumps_says_what_is_missing(arts):
    data = gather(load_artifact(arts["awq"][0]))
    assert data["times"]["source"] is None and "--dump-dir" in data["notes"]["times"]
    assert "--dump-dir" in data["notes"]["clip"]


def test_template_ships_as_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dcc.runtime.templates" in cfg["tool"]["setuptools"]["packages"]
    globs = cfg["tool"]["setuptools"]["package-data"]["dcc.runtime.templates"]
    templates = [p.name for p in (ROOT / "dcc" / "runtime" / "templates").iterdir()]
    assert templates and all(any(fnmatch.fnmatch(t, g) for g in globs) for t in templates)
    assert set(cfg["project"]["optional-dependencies"]["report"]) == {"jinja2>=3.1", "matplotlib>=3.8"}
