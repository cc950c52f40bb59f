"""config.json as TinyChat reads it (dcc/targets/tinychat/engine_config.py, written from TinyChat's source): tiny
Llama-2, Llama-3, Mistral and Qwen2 models compiled for tinychat; the values TinyChat builds its model with (under
its transformers 4.46.0) equal the source's, and a RoPE TinyChat cannot apply is refused before any work."""
import json

import pytest

from dcc.api import CompileOptions, compile_model
from dcc.targets.base import TargetError
from dcc.targets.common.hf4_config import EngineConfigError
from dcc.targets.tinychat import engine_config

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 - one_thread applies to this module

SHAPE = dict(hidden=128, heads=4, kv_heads=2, layers=1, intermediate_size=256)
MODELS = {   # name -> (family, config fields, TinyChat's --model_type): the RoPE each family ships with
    "llama2": ("llama", {}, "llama"),                                               # theta 10000
    "llama3": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "llama"),
    "mistral": ("mistral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}, "llama"),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}, "qwen"),
}
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# what TinyChat reads -> the source config field it must equal
SAME = {"model_type": "model_type", "max_position_embeddings": "max_position_embeddings", "vocab_size": "vocab_size",
        "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
        "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads", "rms_norm_eps": "rms_norm_eps"}


def _save(path, name, rope=None):
    family, kw, _ = MODELS[name]
    kw = {**kw, "rope_parameters": rope} if rope else kw
    save_tiny(path, decoder_config(family, **SHAPE, **kw))
    return path


def _compile(model, out, calib, dtype="float16"):
    opts = CompileOptions(target="tinychat", algo="rtn", dtype=dtype, calib=str(calib), calib_chunks=2,
                          calib_seq_len=32, progress=False)
    return compile_model(str(model), str(out), opts, log=lambda m: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinychat-cfg")
    (d / "ids.txt").write_text(" ".join(str((7 * i) % 100) for i in range(256)))
    out = {}
    for name in MODELS:
        src = _save(d / name, name)
        out[name] = (src, _compile(src, d / f"{name}-art", d / "ids.txt", "bfloat16" if name == "qwen2" else
                                   "float16"))
    return d, out


@pytest.mark.parametrize("name", list(MODELS))
def test_tinychat_reads_the_source_config(built, name):
    src, art = built[1][name]
    source = json.loads((src / "config.json").read_text())
    view = engine_config.load(json.loads((art / "config.json").read_text()))
    assert view["rope_theta"] == source["rope_parameters"]["rope_theta"]   # Llama-3 500000, Qwen2 1e6
    assert view["rope_scaling"] is None and view["decode_rotary_scale"] == 1.0
    # transformers 4.46.0's torch_dtype: the artifact's 16-bit dtype
    assert view["dtype"] == ("bfloat16" if name == "qwen2" else "float16")
    assert view["model_type_flag"] == MODELS[name][2]
    assert view["head_dim"] == (source.get("head_dim") or source["hidden_size"] // source["num_attention_heads"])
    for engine_key, key in SAME.items():
        assert view[engine_key] == source[key], engine_key
    if name == "qwen2":
        assert (view["hidden_act"], view["attention_dropout"]) == (source["hidden_act"], source["attention_dropout"])
    # hidden 128 and 64-wide k/v: TinyChat's GEMM cannot run these shapes (K < 768, N % 128: loader_spec.py)
    assert json.loads((art / "dcc.json").read_text())["engines"] == ["dcc-runtime"]


def test_a_mistral_config_without_rope_scaling_fails_in_tinychat(built):
    """TinyChat's Llama reads config.rope_scaling, a field 4.46.0's MistralConfig does not have: config.json must
    carry it (None) or TinyChat fails with an AttributeError."""
    cfg = json.loads((built[1]["mistral"][1] / "config.json").read_text())
    assert "rope_scaling" in cfg and cfg["rope_scaling"] is None
    del cfg["rope_scaling"]
    with pytest.raises(EngineConfigError, match="rope_scaling"):
        engine_config.load(cfg)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    LLAMA31,
    {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
     "original_max_position_embeddings": 16},
], ids=lambda r: r["rope_type"])
def test_every_scaled_rope_is_refused_before_any_work(built, tmp_path, rope):
    """TinyChat's prefill table ignores the scaling and its decode kernel multiplies positions by the factor: only
    the default variant is TinyChat's."""
    src = _save(tmp_path / "scaled", "llama3", rope={"rope_theta": 500000.0, **rope})
    with pytest.raises(TargetError) as e:
        _compile(src, tmp_path / "refused", built[0] / "ids.txt")
    msg = str(e.value)
    assert "\n" not in msg and "target tinychat" in msg and f"RoPE is {rope['rope_type']}" in msg
    assert "tinychat/models/llama.py" in msg                                   # where TinyChat shows it, for the reader
    if rope is LLAMA31:
        assert "factor 8" in msg and "theta 500000" in msg
    assert not (tmp_path / "refused").exists()
