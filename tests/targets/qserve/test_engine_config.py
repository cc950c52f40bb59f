"""config.json as QServe reads it (dcc/targets/qserve/engine_config.py, written from QServe's source): tiny Llama-2,
Llama-3, Mistral and Qwen2 models compiled for qserve; the values QServe builds its model with (under its
transformers 4.37.2) equal the source's, and a RoPE QServe cannot apply is refused before any work."""
import json

import pytest

from dcc.api import CompileOptions, compile_model
from dcc.runtime.artifact import load_artifact
from dcc.runtime.reference import build_model
from dcc.targets.base import TargetError
from dcc.targets.common.hf4_config import EngineConfigError
from dcc.targets.qserve import engine_config

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 - one_thread applies to this module

SHAPE = dict(hidden=128, heads=4, kv_heads=2, layers=1, intermediate_size=256)
MODELS = {   # name -> (family, config fields): the RoPE each family ships with
    "llama2": ("llama", {}),                                                        # theta 10000
    "llama3": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "mistral": ("mistral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
}
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# what QServe reads -> the source config field it must equal
SAME = {"model_type": "model_type", "max_model_len": "max_position_embeddings", "vocab_size": "vocab_size",
        "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
        "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps"}


def _save(path, name, rope=None):
    family, kw = MODELS[name]
    kw = {**kw, "rope_parameters": rope} if rope else kw
    save_tiny(path, decoder_config(family, head_dim=32, **SHAPE, **kw))
    return path


def _compile(model, out, calib):
    opts = CompileOptions(target="qserve", algo="rtn", calib=str(calib), calib_chunks=2, calib_seq_len=32,
                          progress=False)
    return compile_model(str(model), str(out), opts, log=lambda m: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("qserve-cfg")
    (d / "ids.txt").write_text(" ".join(str((7 * i) % 100) for i in range(256)))
    out = {}
    for name in MODELS:
        src = _save(d / name, name)
        out[name] = (src, _compile(src, d / f"{name}-art", d / "ids.txt"))
    return d, out


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral"])
def test_qserve_reads_the_source_config(built, name):
    src, art = built[1][name]
    source = json.loads((src / "config.json").read_text())
    view = engine_config.load(json.loads((art / "config.json").read_text()))
    assert view["rope_theta"] == source["rope_parameters"]["rope_theta"]   # Llama-3 500000, not QServe's 10000
    assert view["rope_scaling"] is None
    assert view["dtype"] == "float16"                                      # transformers 4.37.2's torch_dtype
    assert view["architecture"] == source["architectures"][0]
    assert view["sliding_window"] == source.get("sliding_window")
    assert view["attention_bias"] == source.get("attention_bias", False)
    for engine_key, key in SAME.items():
        assert view[engine_key] == source[key], engine_key
    assert "qserve" in json.loads((art / "dcc.json").read_text())["engines"]


def test_qwen2_is_no_qserve_model_but_its_config_is_in_the_4x_form(built):
    src, art = built[1]["qwen2"]
    source = json.loads((src / "config.json").read_text())
    cfg = json.loads((art / "config.json").read_text())
    with pytest.raises(EngineConfigError, match="Qwen2ForCausalLM"):   # QServe's model runner builds Llama/Mistral
        engine_config.load(cfg)
    assert "qserve" not in json.loads((art / "dcc.json").read_text())["engines"]
    assert cfg["rope_theta"] == source["rope_parameters"]["rope_theta"] and cfg["rope_scaling"] is None
    assert cfg["torch_dtype"] == "float16"


def test_both_transformers_read_the_same_rope(built):
    """The transformers-4 fields sit beside rope_parameters, and transformers 5 (dcc's runtime) reads the same RoPE
    from the artifact as the engine does."""
    src, art = built[1]["llama3"]
    source = json.loads((src / "config.json").read_text())
    cfg = json.loads((art / "config.json").read_text())
    model = build_model(load_artifact(art))
    assert model.config.rope_parameters == source["rope_parameters"]
    assert cfg["rope_theta"] == model.config.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    LLAMA31,
    {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
     "original_max_position_embeddings": 16},
], ids=lambda r: r["rope_type"])
def test_every_scaled_rope_is_refused_before_any_work(built, tmp_path, rope):
    """QServe's RoPE kernels run at scale 1 with rope_theta: only the default variant is QServe's."""
    src = _save(tmp_path / "scaled", "llama3", rope={"rope_theta": 500000.0, **rope})
    with pytest.raises(TargetError) as e:
        _compile(src, tmp_path / "refused", built[0] / "ids.txt")
    msg = str(e.value)
    assert "\n" not in msg and "target qserve" in msg and f"RoPE is {rope['rope_type']}" in msg
    assert "update_kv_cache.cu" in msg                                   # where QServe shows it, for the reader
    if rope is LLAMA31:
        assert "factor 8" in msg and "theta 500000" in msg
    assert not (tmp_path / "refused").exists()
