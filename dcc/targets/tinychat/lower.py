"""The TinyChat target's face to the compiler: spec, pipeline, layer rule, emitter and config for given options."""
from __future__ import annotations

from .emit import FORMAT, TinyChatEmitter as Emitter, engines_for as _engines  # noqa: F401  (re-exported)
from .pipeline import make_spec_assigner, pipeline, preflight, weight_spec  # noqa: F401


DEFAULT_GROUP_SIZE = 128   # TinyChat's kernels


def spec_for(opts):
    gs = DEFAULT_GROUP_SIZE if opts.group_size is None else opts.group_size
    return weight_spec(opts.bits, gs, opts.dtype, zero_for(getattr(opts, "zero", "auto"), opts.algo))


def engines_for(spec, emitter=None) -> list[str]:
    return _engines(spec.group_size)


def zero_for(zero: str, algo: str) -> str:
    """'auto': float zero points where a search picks the ranges (awq's clip, gptq's error feedback), integer ones
    for plain rtn, where they measured better (SmolLM2 g64: rtn 40.17 integer vs 42.87 float; awq 33.27 float vs
    34.53 integer; gptq 35.69 float vs 38.19 integer; bench/accuracy.py)."""
    if zero != "auto":
        return zero
    return "integer" if algo == "rtn" else "float"


def steps_for(opts):
    return pipeline(opts.algo)


def assigner_for(opts, spec):
    return make_spec_assigner(spec, opts.unsupported)


def hf_config(lm, spec, opts, emitter) -> dict:
    """The source config with dtype, tie flag and a quantization_config saying what the tensors are."""
    cfg = lm.config.to_dict()
    cfg["dtype"] = opts.dtype
    cfg["tie_word_embeddings"] = bool(emitter.tied)
    cfg["quantization_config"] = {
        "quant_method": "awq", "version": "tinychat-v2", "format": FORMAT, "producer": "dcc",
        "bits": spec.bits, "group_size": spec.group_size, "zero_point": True,
        "modules_in_16bit": sorted(k for k, v in emitter.layers.items() if "skip_reason" in v),
    }
    return cfg
