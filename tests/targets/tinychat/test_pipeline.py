"""The TinyChat target's choices: pipelines per algorithm, the spec rule (zero points), and the layout preflight."""
from types import SimpleNamespace

import pytest

from dcc.compiler.pass_manager import check_pipeline
from dcc.targets.common.awq_layout import LayoutError
from dcc.targets.base import get_target
from dcc.targets.tinychat.target import zero_for
from dcc.targets.tinychat.pipeline import ALGOS, pipeline, preflight, weight_spec
from tiny_models import decoder_config


def test_every_algorithm_is_a_valid_pipeline_ending_in_quantization():
    for algo in ALGOS:
        steps = pipeline(algo)
        check_pipeline(steps)
        assert steps[-1].name in ("rtn", "gptq")
    with pytest.raises(ValueError, match="unknown algorithm"):
        pipeline("nope")


def test_auto_zero_points_follow_the_algorithm():
    assert zero_for("auto", "rtn") == "integer"
    assert zero_for("auto", "awq") == zero_for("auto", "gptq") == "float"
    assert zero_for("integer", "awq") == "integer"
    t = get_target("tinychat")
    assert t.spec(t.options(group_size=64, algo="rtn")).zero_mode == "scaled"   # integer zero, stored as -s*z
    assert t.spec(t.options(group_size=64, algo="awq")).zero_mode == "float"
    with pytest.raises(ValueError):
        weight_spec(zero="half")


def test_preflight_names_the_first_layer_and_counts_the_rest():
    import torch
    from transformers import AutoModelForCausalLM
    cfg = decoder_config("llama", hidden=128, intermediate_size=192)   # down_proj reads 192: not a multiple of 128
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    lm = SimpleNamespace(blocks=model.model.layers, block_prefix=lambda i: f"model.layers.{i}")
    with pytest.raises(LayoutError, match=r"model\.layers\.0\.mlp\.down_proj.*192.*and 1 more layers"):
        preflight(lm, weight_spec(group_size=128), "error")
    kept = preflight(lm, weight_spec(group_size=128), "keep")
    assert [k.split(":")[0] for k in kept] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert preflight(lm, weight_spec(group_size=64), "error") == []
