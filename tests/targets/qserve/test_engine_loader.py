"""QServe's loader as the judge of an artifact (dcc/targets/qserve/loader_spec.py, written from mit-han-lab/qserve
5b44fe6: the model QServe builds from config.json, the buffers of its linears, load_weights' name matching,
slicing and asserts): tied heads are written out (QServe never ties them), the manifest lists QServe only where its
model is right for the config, and check_artifact names each problem."""
import json

import pytest
import torch

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.runtime.validate import check_exact
from dcc.targets.base import get_target
from dcc.targets.qserve import loader_spec

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 - one_thread applies to this module


class _Index(dict):
    """What check() reads of an artifact: .keys() and .get(name)."""


def _compile(tmp, name, cfg, bits=4, group=0, algo="qoq-rtn"):
    src = tmp / name
    save_tiny(src, cfg, seed=1)
    ids = torch.randint(0, 100, (2 * 32,), generator=torch.Generator().manual_seed(0))
    (tmp / "ids.txt").write_text(" ".join(map(str, ids.tolist())))
    opts = CompileOptions(target="qserve", algo=algo, bits=bits, group_size=group, calib=str(tmp / "ids.txt"),
                          calib_chunks=2, calib_seq_len=32, progress=False)
    return load_artifact(compile_model(str(src), str(tmp / f"{name}-art"), opts, log=lambda m: None))


def _cfg(**kw):
    return decoder_config("llama", hidden=128, heads=4, kv_heads=2, layers=1, intermediate_size=256, **kw)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """W8A8 keeps the norms (its loader reads them), so the head stays tied to the embeddings."""
    return _compile(tmp_path_factory.mktemp("tied"), "tied", _cfg(tie_word_embeddings=True), bits=8,
                    algo="smoothquant")


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """W4A8 folds the final norm into the head (QServe skips norms), which unties it."""
    return _compile(tmp_path_factory.mktemp("w4"), "w4", _cfg(tie_word_embeddings=True))


def test_tied_head_is_written_for_qserve(tied, w4):
    """QServe's load_weights fills lm_head only from an lm_head.weight tensor: dcc writes the tied head out."""
    assert tied.config["tie_word_embeddings"] is True
    keys = set(tied.tensors.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys
    assert torch.equal(tied.tensors.get("lm_head.weight"), tied.tensors.get("model.embed_tokens.weight"))
    assert get_target("qserve").check_artifact(tied) == []
    assert "qserve" in tied.manifest["engines"]
    assert all(check_exact(tied).values())
    assert w4.config["tie_word_embeddings"] is False and "lm_head.weight" in set(w4.tensors.keys())
    assert get_target("qserve").check_artifact(w4) == [] and "qserve" in w4.manifest["engines"]


def test_missing_head_is_a_problem(tied):
    index = _Index({k: tied.tensors.get(k) for k in tied.tensors.keys() if k != "lm_head.weight"})
    problems = loader_spec.check(index, tied.config, "qserve-w8a8", 0)
    assert problems == ["lm_head.weight: never loaded (QServe does not tie it to embed_tokens: the head would stay "
                        "randomly initialised)"]


def test_loader_name_matching_and_asserts(w4):
    tied = w4
    fmt = "qserve-w4a8-per-channel"
    base = {k: tied.tensors.get(k) for k in tied.tensors.keys()}
    # a tensor QServe's model has no parameter for: load_weights' state_dict[name] raises
    extra = _Index({**base, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128, dtype=torch.float16)})
    assert any("qkv_proj.bias" in p and "KeyError" in p for p in loader_spec.check(extra, tied.config, fmt, 0))
    # a k_proj of the wrong height: the slice assertion of the fused qkv_proj fails
    k = "model.layers.0.self_attn.k_proj.qweight"
    bad = _Index({**base, k: base[k][:32]})
    assert any(p.startswith(k) and "assertion fails" in p for p in loader_spec.check(bad, tied.config, fmt, 0))
    # codes stored as floats would be cast by copy_
    s = "model.layers.0.mlp.down_proj.qweight"
    cast = _Index({**base, s: base[s].to(torch.float16)})
    assert any(p.startswith(s) and "cast" in p for p in loader_spec.check(cast, tied.config, fmt, 0))
    # a norm gain that is not 1 is skipped by the W4A8 loader
    n = "model.layers.0.input_layernorm.weight"
    gain = _Index({**base, n: torch.full_like(base[n], 2.0)})
    assert any(p.startswith(n) and "skips norm" in p for p in loader_spec.check(gain, tied.config, fmt, 0))


def test_config_problems_from_the_model_constructor():
    ok = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "rope_theta": 10000.0}
    assert loader_spec.config_problems(ok, "qserve-w4a8-per-channel", 0) == []
    wide_heads = {**ok, "head_dim": 64}     # QServe builds head_dim = hidden // heads = 32
    assert any("head_dim 64" in p for p in loader_spec.config_problems(wide_heads, "qserve-w4a8-group", 128))
    theta = {**ok, "rope_theta": 500000.0}  # W8A8's kernels rotate with base 10000
    assert loader_spec.config_problems(theta, "qserve-w4a8-per-channel", 0) == []
    assert any("rope_theta 500000" in p for p in loader_spec.config_problems(theta, "qserve-w8a8", 0))
    assert any("multiple of the group size" in p
               for p in loader_spec.config_problems({**ok, "intermediate_size": 320}, "qserve-w4a8-group", 128))


def test_w8a8_with_another_rope_base_is_not_listed_for_qserve(tmp_path):
    art = _compile(tmp_path, "theta", _cfg(rope_theta=500000.0), bits=8, algo="smoothquant")
    assert art.manifest["engines"] == ["dcc-runtime"]
    assert any("rope_theta" in p for p in get_target("qserve").check_artifact(art))
    assert json.loads((art.path / "config.json").read_text())["rope_theta"] == 500000.0
