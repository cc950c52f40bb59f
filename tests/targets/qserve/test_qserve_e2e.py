"""The QServe target end to end on a tiny saved Llama whose shapes every QServe layout takes (hidden 128, MLP 256):
compile per channel, g128 and W8A8; the artifact has the keys, dtypes and shapes QServe's loader reads, decodes to
exactly the evaluated weights, and its CPU reference computes QServe's epilogue."""
import hashlib
import json

import numpy as np
import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.targets.qserve.reference import QServeLinear
from dcc.runtime.validate import check_exact, compare_with_float, sample_ids
from dcc.targets.qserve import layout, loader_spec

import qserve_engine as engine
from tiny_models import decoder_config, lazy, save_tiny

CASES = [(4, 0, "qoq-rtn"), (4, 128, "qoq"), (8, 0, "smoothquant")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    cfg = decoder_config("llama", hidden=128, heads=4, kv_heads=2, head_dim=32, layers=2, intermediate_size=256)
    save_tiny(d, cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (4 * 64,), generator=torch.Generator().manual_seed(0))
    (d.parent / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    return d


def _compile(model_dir, out, bits, gs, algo, **kw):
    opts = CompileOptions(target="qserve", algo=algo, bits=bits, group_size=gs, calib=str(model_dir.parent / "calib.txt"),
                          calib_chunks=4, calib_seq_len=64, progress=False, **kw)
    return compile_model(str(model_dir), str(out), opts, log=lambda m: None)


@pytest.fixture(scope="module")
def artifacts(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("arts")
    return {c: _compile(model_dir, d / f"{c[0]}-{c[1]}-{c[2]}", *c) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-g{c[1]}-{c[2]}")
def test_artifact_loads_in_qserve_and_decodes_exactly(artifacts, case):
    bits, gs, algo = case
    art = load_artifact(artifacts[case])
    m = art.manifest
    fmt = {0: "qserve-w4a8-per-channel", 128: "qserve-w4a8-group"}[gs] if bits == 4 else "qserve-w8a8"
    assert m["target"] == "qserve" and "qserve" in m["engines"]
    assert {e["format"] for e in m["layers"].values()} == {fmt}
    assert loader_spec.check(art.tensors, art.config, fmt, gs) == []
    assert m["runtime"]["activations"] == "int8-per-token"
    assert m["runtime"]["kv_bits"] == (4 if bits == 4 else None)
    exact = check_exact(art)
    assert len(exact) == 14 and all(exact.values())
    qc = art.config["quantization_config"]
    assert qc["quant_method"] == "qserve" and qc["bits"] == bits


def test_norms_are_folded_for_w4a8(artifacts):
    art = load_artifact(artifacts[(4, 0, "qoq-rtn")])
    norms = [k for k in art.tensors.keys() if "norm" in k]
    assert norms and all(bool((art.tensors.get(k).float() == 1).all()) for k in norms)


def test_reference_linear_is_qserves_epilogue(artifacts):
    """QServeLinear on a compiled layer against QServe's kernels emulated instruction by instruction
    (tests/qserve_engine.py: quantization, integer GEMM, the float32 epilogue in the engine's order)."""
    for case in CASES:
        art = load_artifact(artifacts[case])
        name = "model.layers.1.mlp.down_proj"
        entry = art.manifest["layers"][name]
        n, k = entry["shape"]
        t = {key: art.tensors.get(f"{name}.{key}") for key in ("qweight", "s1_scales", "s1_szeros", "s2_scales",
                                                              "s2_zeros", "weight", "dequant_scale")
             if f"{name}.{key}" in art.tensors.keys()}
        lin = QServeLinear(entry["format"], t, n, k, None)
        x = torch.randn(5, k) * 3
        x16 = x.half().numpy()
        codes, ascale = engine.quantize(x16)
        if entry["format"] == "qserve-w8a8":
            want = engine.epilogue_scaled(codes @ t["weight"].numpy().astype(np.int64).T, t["dequant_scale"].numpy(),
                                          ascale)
        elif entry["format"] == "qserve-w4a8-group":
            w8 = layout.int8_codes_g128(t["qweight"], t["s2_scales"], t["s2_zeros"], n, k).numpy().astype(np.int64)
            want = engine.epilogue_scaled(codes @ w8.T, t["s1_scales"].numpy(), ascale)
        else:
            q = layout.unpack_qweight(t["qweight"], n, k).numpy().astype(np.int64)
            want = engine.epilogue_per_channel(codes @ q.T, t["s1_scales"].numpy(), t["s1_szeros"].numpy(), ascale,
                                               engine.token_sum(x16))
        assert np.array_equal(lin(x).half().numpy().view(np.int16), want.view(np.int16)), case


def test_reference_model_tracks_the_float_model(artifacts, model_dir):
    fm = lazy(model_dir).materialize_all()
    ids = sample_ids(100, 2, 32)
    for case in CASES:
        art = load_artifact(artifacts[case])
        cmp = compare_with_float(art, fm, ids)
        # (per-layer errors are not compared: rotation and smoothing change each layer's basis on purpose)
        assert len(cmp["layers"]) == 14 and cmp["top1_agreement"] > 0.6, (case, cmp["top1_agreement"])
        assert cmp["kl"] < 0.1, (case, cmp["kl"])


def test_same_inputs_same_bytes(model_dir, tmp_path, artifacts):
    again = _compile(model_dir, tmp_path / "again", 4, 128, "qoq")
    first = artifacts[(4, 128, "qoq")]
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(first)
    assert json.loads((again / "dcc.json").read_text())["files"] == json.loads((first / "dcc.json").read_text())["files"]


def test_bad_options(model_dir, tmp_path):
    with pytest.raises(ValueError, match="4-bit .* or 8-bit"):
        _compile(model_dir, tmp_path / "x", 3, 0, "rtn")
    with pytest.raises(ValueError, match="--group-size 32"):
        _compile(model_dir, tmp_path / "y", 4, 32, "rtn")
    with pytest.raises(ValueError, match="smoothquant is the W8A8"):
        _compile(model_dir, tmp_path / "z", 4, 0, "smoothquant")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
