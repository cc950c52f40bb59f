"""The transformers-4 form of a transformers-5 config (dcc/targets/common/hf4_config.py) for every RoPE variant
transformers 5 knows: top-level rope_theta and rope_scaling with the keys 4.x requires and the source's values,
torch_dtype beside dtype, and transformers 5 still reads the same RoPE back; and the plain-RoPE check the engines
share."""
import pytest
import transformers as T

from dcc.targets.common.hf4_config import (HF4_REQUIRED, ROPE_TYPES, hf4_rope_scaling_error, plain_rope_problem,
                                           ropes, to_hf4)

from tiny_models import decoder_config

VARIANTS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 4},                      # an int factor: 4.37.2 takes floats only
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 16},
}


def _config(rope_type, theta=500000.0):
    return decoder_config("llama", rope_parameters={"rope_type": rope_type, "rope_theta": theta,
                                                    **VARIANTS[rope_type]})


def test_the_variants_are_transformers_5s():
    assert set(VARIANTS) == set(ROPE_TYPES)
    assert set(ROPE_TYPES) <= set(T.modeling_rope_utils.ROPE_INIT_FUNCTIONS) | {"default"}


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_every_variant_has_its_transformers_4_form(rope_type):
    src = _config(rope_type).to_dict()
    out = to_hf4(src, "bfloat16")
    assert out["torch_dtype"] == out["dtype"] == "bfloat16"
    assert out["rope_theta"] == 500000.0 and out["rope_parameters"] == src["rope_parameters"]
    rs = out["rope_scaling"]
    if rope_type == "default":
        assert rs is None
        return
    params = {k: v for k, v in src["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
    assert {k: v for k, v in rs.items() if k not in ("rope_type", "type")} == params
    assert HF4_REQUIRED[rope_type] <= set(rs)
    assert hf4_rope_scaling_error(rs, "4.46.0") is None
    if rope_type in ("linear", "dynamic"):         # the one form 4.37.2 (QServe's) and 4.46.0 both take
        assert rs == {"type": rope_type, "factor": float(params["factor"])}
        assert isinstance(rs["factor"], float) and hf4_rope_scaling_error(rs, "4.37.2") is None
    else:
        assert rs["rope_type"] == rope_type and hf4_rope_scaling_error(rs, "4.37.2")


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_transformers_5_reads_the_same_rope_back(rope_type):
    src = _config(rope_type).to_dict()
    out = to_hf4(src, "float16")
    back = T.AutoConfig.for_model(out.pop("model_type"), **{k: v for k, v in out.items()
                                                             if k != "transformers_version"})
    assert {k: v for k, v in back.rope_parameters.items() if k != "type"} == src["rope_parameters"]


def test_partial_rotary_factor_goes_to_the_top_level():
    src = T.PhiConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                      partial_rotary_factor=0.5).to_dict()
    assert "partial_rotary_factor" not in src           # transformers 5 keeps it in rope_parameters
    assert to_hf4(src, "float16")["partial_rotary_factor"] == 0.5
    problem = plain_rope_problem(src, "Engine", "here")
    assert problem and "partial_rotary_factor 0.5" in problem


def test_ropes_by_layer_type_and_models_without_rope():
    src = T.Gemma3TextConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, head_dim=16, intermediate_size=128).to_dict()
    by_type = ropes(src)
    assert set(by_type) == {"full_attention", "sliding_attention"}
    out = to_hf4(src, "float16")
    assert "rope_theta" not in out and out["torch_dtype"] == "float16"   # no 4.x form: left as it is
    problem = plain_rope_problem(src, "Engine", "here")
    assert problem and "differs by layer type" in problem and "\n" not in problem
    opt = decoder_config("opt").to_dict()
    assert ropes(opt) == {} and plain_rope_problem(opt, "Engine", "here") is None
    assert "rope_scaling" not in to_hf4(opt, "float16")


def test_a_transformers_4_config_reads_the_same():
    """A config written by 4.x (top-level rope_theta / rope_scaling, no rope_parameters) gives the same RoPE."""
    v4 = {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
                                                                          **VARIANTS["llama3"]}}
    v5 = _config("llama3").to_dict()
    assert ropes(v4) == ropes(v5)
    assert to_hf4(v4, "float16")["rope_scaling"] == to_hf4(v5, "float16")["rope_scaling"]
