"""The TinyChat target (AWQ W4A16, research/targets.md 2): its options, pipelines, spec rule, emitter, config and
format, registered under the name "tinychat"."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import Format, Target, TargetError, TargetOptions, register_target
from ..common.hf4_config import to_hf4
from ..common import awq_layout as layout
from . import engine_config, loader_spec
from .emit import FORMAT, TinyChatEmitter, engines_for
from .pipeline import ALGOS, make_spec_assigner, pipeline, preflight, weight_spec

DEFAULT_GROUP_SIZE = 128   # TinyChat's kernels


@dataclass(frozen=True)
class TinyChatOptions(TargetOptions):
    """algo: rtn | awq | gptq | awq+gptq; bits: 4 (the layout packs 4-bit codes); group_size: 128 (TinyChat's
    kernels), 64 or 32 (dcc's runtime); zero: auto | float | integer (see zero_for).

        TinyChatOptions(algo="awq", group_size=64)
    """
    algo: str = "awq"
    zero: str = "auto"

    def __post_init__(self):
        super().__post_init__()   # the algorithm is checked by Target.options
        if self.zero not in ("auto", "float", "integer"):
            raise TargetError(f"--zero {self.zero}: use auto, float or integer")
        if self.bits != 4:
            raise TargetError(f"--bits {self.bits}: TinyChat's layout (W4A16) packs 4-bit weights only; use --bits 4")
        gs = self.group_size
        if gs is not None and gs not in layout.GROUP_SIZES:
            raise TargetError(f"--group-size {gs}: TinyChat quantizes in groups of 128 (TinyChat's kernels), "
                              f"64 or 32 (dcc's runtime only)")


def zero_for(zero: str, algo: str) -> str:
    """'auto': float zero points where a search picks the ranges (awq's clip, gptq's error feedback), integer ones
    for plain rtn, where they measured better (SmolLM2 g64: rtn 40.17 integer vs 42.87 float; awq 33.27 float vs
    34.53 integer; gptq 35.69 float vs 38.19 integer; bench/accuracy.py)."""
    if zero != "auto":
        return zero
    return "integer" if algo == "rtn" else "float"


def _decode(tensors, prefix: str, entry: dict):
    n, k = entry["shape"]
    return layout.decode_weight(tensors.get(f"{prefix}.qweight"), tensors.get(f"{prefix}.scales"),
                                tensors.get(f"{prefix}.scaled_zeros"), entry["spec"]["group_size"], k)


@register_target
class TinyChat(Target):
    name = "tinychat"
    engine_name = "TinyChat"
    summary = "TinyChat W4A16 (AWQ layout: int16 qweight [N/4, K], fp16 scales and scaled zeros per group)"
    Options = TinyChatOptions
    algos = ALGOS
    # a plain nn.Linear holding the decoded 16-bit weight computes exactly what TinyChat's W4A16 kernels compute
    formats = {FORMAT: Format(FORMAT, ("qweight", "scales", "scaled_zeros"), _decode)}
    cuda_extension = "w4a16"

    def spec(self, opts):
        gs = DEFAULT_GROUP_SIZE if opts.group_size is None else opts.group_size
        return weight_spec(opts.bits, gs, opts.dtype, zero_for(opts.zero, opts.algo))

    def pipeline(self, opts):
        return pipeline(opts.algo)

    def assigner(self, opts, spec):
        return make_spec_assigner(spec, opts.unsupported)

    def preflight(self, lm, spec, opts):
        # refused, not kept for dcc's runtime alone: an artifact of this target is one TinyChat would load and run
        # with wrong positions (its RoPE kernels apply plain rope_theta only: engine_config.py)
        problem = engine_config.rope_problem(lm.config.to_dict())
        if problem:
            raise TargetError(f"{lm.path.name}: target tinychat refuses this model: {problem}")
        return preflight(lm, spec, opts.unsupported)

    def emitter(self, writer, opts):
        import torch
        return TinyChatEmitter(writer, getattr(torch, opts.dtype))

    def engines(self, spec, emitter):
        return engines_for(spec.group_size, emitter.layers)

    def hf_config(self, lm, spec, opts, emitter) -> dict:
        """The source config in the form TinyChat's transformers (4.46.0) reads (rope_theta, rope_scaling,
        torch_dtype: engine_config.py), with the tie flag and a quantization_config saying what the tensors are."""
        cfg = to_hf4(lm.config.to_dict(), opts.dtype)
        cfg["tie_word_embeddings"] = bool(emitter.tied)
        cfg["quantization_config"] = {
            "quant_method": "awq", "version": "tinychat-v2", "format": FORMAT, "producer": "dcc",
            "bits": spec.bits, "group_size": spec.group_size, "zero_point": True,
            "modules_in_16bit": sorted(k for k, v in emitter.layers.items() if "skip_reason" in v),
        }
        if spec.group_size == loader_spec.GROUP:   # why TinyChat's kernels cannot run a layer, where they cannot
            notes = loader_spec.check(None, emitter.layers, None)
            if notes:
                cfg["quantization_config"]["kernel_notes"] = notes[:20]
        return cfg

    def check_artifact(self, art) -> list[str]:
        """TinyChat's loader and kernels as written down in loader_spec.py (llm-awq d6e797a)."""
        first = next(iter(art.quantized_layers()), None)
        dtype = art.tensors.get(f"{first}.scales").dtype if first else None   # the model dtype: fp16 or bf16
        return loader_spec.check(art.tensors, art.manifest["layers"], dtype)

    def fast_decoder(self):
        from .fastlm import TinyChatFast
        return TinyChatFast()

    def cuda_model(self, art, device="cuda"):
        from .cuda import build_cuda_model
        return build_cuda_model(art, device)

    def check_exact_cuda(self, art, device="cuda", kernels=None):
        from .cuda import check_exact_cuda
        return check_exact_cuda(art, device)
