"""End to end through the `dcc` command on stories260K (a real 260K-parameter Llama, no tokenizer: calibration and
evaluation files hold token ids): compile, inspect, validate, eval, determinism and bad input."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_util import error_line, run

STORIES = Path(__file__).resolve().parents[3] / "shared" / "assets" / "stories260K" / "hf"
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs ../shared/assets ({STORIES} is absent)")


@pytest.fixture(scope="module")
def ids_files(tmp_path_factory):
    """Token ids the float model samples itself (real-looking text for a model without a tokenizer)."""
    from dcc.models.loader import LazyModel
    d = tmp_path_factory.mktemp("ids")
    model = LazyModel(STORIES).materialize_all()
    torch.manual_seed(0)
    seqs = model.generate(torch.ones(8, 1, dtype=torch.long), do_sample=True, max_new_tokens=255, min_new_tokens=255,
                          pad_token_id=0)
    (d / "calib.txt").write_text(" ".join(map(str, seqs[:4].flatten().tolist())))
    (d / "eval.txt").write_text(" ".join(map(str, seqs[4:].flatten().tolist())))
    return d / "calib.txt", d / "eval.txt"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ids_files):
    out = tmp_path_factory.mktemp("art") / "a"
    code, text = run("compile", STORIES, "--algo", "awq", "--group-size", "64", "--unsupported", "keep",
                     "--calib", ids_files[0], "--calib-chunks", "4", "--calib-seq-len", "128", "-o", out, "-q")
    assert code == 0, text
    return out


def test_compile_writes_a_complete_artifact(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"model.safetensors", "config.json", "dcc.json"} <= names
    m = json.loads((artifact / "dcc.json").read_text())
    assert m["target"] == "tinychat" and m["engines"] == ["dcc-runtime"]   # group 64: not TinyChat's kernels
    layers = m["layers"]
    # down_proj reads 172 features: the layout cannot take it, so it stays 16-bit with the reason recorded
    assert all("skip_reason" in v for k, v in layers.items() if k.endswith("down_proj"))
    quant = [k for k, v in layers.items() if "skip_reason" not in v]
    assert len(quant) == 5 * 6
    t = load_file(str(artifact / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.qweight"].dtype == torch.int16 and tuple(t[f"{q}.qweight"].shape) == (16, 64)
    assert t[f"{q}.scales"].dtype == torch.float16 and tuple(t[f"{q}.scales"].shape) == (16, 64)  # 1 group -> 16 rows
    assert m["recipe"]["pipeline"][0]["pass"] == "awq"
    assert not list(artifact.parent.glob(".a.tmp-*"))


def test_inspect_and_validate(artifact):
    code, text = run("inspect", artifact)
    assert code == 0 and "30 of 35 linears quantized" in text
    code, text = run("validate", artifact, "--model", STORIES)
    assert code == 0, text
    assert "30/30 layers" in text and "top-1 agreement" in text


def test_eval_artifact_against_baseline(artifact, ids_files, tmp_path):
    js = tmp_path / "ppl.json"
    code, text = run("eval", artifact, "--ppl", ids_files[1], "--seq-len", "256", "--baseline", STORIES,
                     "--json", js, "-q")
    assert code == 0, text
    r = json.loads(js.read_text())
    base, art = r["baseline"]["ppl"], r["artifact"]["ppl"]
    assert r["artifact"]["windows"] == 4 and r["artifact"]["tokens"] == 4 * 255
    # a 64-wide model loses much at 4 bits, but the artifact must still beat a uniform guess over its 512 tokens
    assert base < art < 512


def test_same_inputs_same_bytes(artifact, ids_files, tmp_path):
    out = tmp_path / "again"
    code, _ = run("compile", STORIES, "--algo", "awq", "--group-size", "64", "--unsupported", "keep",
                  "--calib", ids_files[0], "--calib-chunks", "4", "--calib-seq-len", "128", "-o", out, "-q")
    assert code == 0
    for f in artifact.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_refuses_to_overwrite_without_force(artifact, ids_files):
    before = (artifact / "dcc.json").read_bytes()
    code, text = run("compile", STORIES, "--group-size", "64", "--unsupported", "keep", "--calib", ids_files[0],
                     "--calib-chunks", "2", "--calib-seq-len", "64", "-o", artifact, "-q")
    assert code == 2 and "already exists" in error_line(text) and "--force" in text
    assert (artifact / "dcc.json").read_bytes() == before


def test_group_128_names_the_layer(ids_files, tmp_path):
    code, text = run("compile", STORIES, "--calib", ids_files[0], "--calib-chunks", "2", "--calib-seq-len", "64",
                     "-o", tmp_path / "x", "-q")
    assert code == 2
    assert len(text.strip().splitlines()) == 1   # checked before any work: nothing else printed
    assert "model.layers.0.self_attn.q_proj" in error_line(text) and "128" in text
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


@pytest.mark.parametrize("case", ["missing", "empty_calib", "words_calib", "nan", "truncated"])
def test_bad_input_is_one_clear_line(case, ids_files, tmp_path):
    model, calib = STORIES, ids_files[0]
    expect = None
    if case == "missing":
        model, expect = tmp_path / "nope", "nope"
    elif case == "empty_calib":
        calib = tmp_path / "empty.txt"
        calib.write_text("")
        expect = "empty.txt"
    elif case == "words_calib":
        calib = tmp_path / "words.txt"
        calib.write_text("once upon a time")
        expect = "token ids"
    else:
        model = tmp_path / "m"
        shutil.copytree(STORIES, model)
        st = model / "model.safetensors"
        if case == "nan":
            t = load_file(str(st))
            t["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
            save_file(t, str(st))
            expect = "model.layers.2.mlp.up_proj.weight"
        else:
            st.write_bytes(st.read_bytes()[: os.path.getsize(st) // 2])
            expect = "model.safetensors"
    code, text = run("compile", model, "--group-size", "64", "--unsupported", "keep", "--calib", calib,
                     "--calib-chunks", "2", "--calib-seq-len", "64", "-o", tmp_path / "out", "-q")
    assert code == 2, text
    assert expect in error_line(text)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_validate_detects_a_changed_artifact(artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    st = bad / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    code, text = run("validate", bad)
    assert code == 2 and "model.safetensors" in error_line(text) and "checksum" in text


def test_dump_dir_writes_listing_json_and_onnx(ids_files, tmp_path):
    dumps = tmp_path / "dumps"
    code, text = run("compile", STORIES, "--algo", "gptq", "--group-size", "64", "--unsupported", "keep",
                     "--calib", ids_files[0], "--calib-chunks", "2", "--calib-seq-len", "64", "-o", tmp_path / "o",
                     "--dump-dir", dumps, "-q")
    assert code == 0, text
    b0 = dumps / "model.layers.0"
    assert sorted(p.name for p in b0.iterdir()) == ["00_capture.json", "00_capture.txt", "01_gptq.json", "01_gptq.txt"]
    rec = json.loads((b0 / "01_gptq.json").read_text())
    assert rec["linears"]["self_attn.q_proj"]["quantized"] and not rec["linears"]["mlp.down_proj"]["quantized"]
    assert "mlp.down_proj" in (b0 / "01_gptq.txt").read_text()
    import onnx
    g = onnx.load(str(dumps / "model.layers.0.onnx")).graph
    assert sum(n.op_type == "linear" for n in g.node) == 7


def test_recipe_file_replaces_algo(ids_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - {pass: clip, config: {grid: 4}}\n  - {pass: rtn}\n")
    out = tmp_path / "o"
    code, text = run("compile", STORIES, "--recipe", recipe, "--group-size", "64", "--unsupported", "keep",
                     "--calib", ids_files[0], "--calib-chunks", "2", "--calib-seq-len", "64", "-o", out, "-q")
    assert code == 0, text
    m = json.loads((out / "dcc.json").read_text())
    assert [s["pass"] for s in m["recipe"]["pipeline"]] == ["clip", "rtn"]
    assert m["recipe"]["pipeline"][0]["config"]["grid"] == 4
    recipe.write_text("passes:\n  - {pass: nosuchpass}\n")
    code, text = run("compile", STORIES, "--recipe", recipe, "--group-size", "64", "--unsupported", "keep",
                     "--calib", ids_files[0], "-o", tmp_path / "o2", "-q")
    assert code == 2 and "nosuchpass" in error_line(text) and "r.yaml" in error_line(text)


def test_passes_lists_every_registered_pass():
    code, text = run("passes")
    assert code == 0
    for name in ("rtn", "awq", "clip", "gptq", "smooth", "fuse_norms", "rotate"):
        assert f"\n{name}: " in "\n" + text
    assert "    damp = 0.01" in text
