"""The Nunchaku target (SVDQuant W4A4 with a 16-bit low-rank branch, research/targets.md 3): its options,
pipelines, spec rule, emitter, config and format, registered under the name "nunchaku".

Nunchaku's engine runs diffusion transformers; for a causal LM (which Nunchaku has no engine for) the artifact holds
Nunchaku's per-layer tensors for dcc's runtime, and the manifest says so."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Format, Target, TargetError, TargetOptions, register_target
from ..common.hf4_config import to_hf4
from .emit import FORMAT, TENSORS, NunchakuEmitter, unpack_linear
from .pipeline import ALGOS, GROUP_SIZE, PRECISIONS, make_spec_assigner, pipeline, preflight, weight_spec
from .reference import NunchakuLinear, decode_int4_weight


@dataclass(frozen=True)
class NunchakuOptions(TargetOptions):
    """algo: svdquant | svdquant-gptq | smoothquant | rtn; precision: int4 (W4A4, groups of 64); rank: of the
    16-bit branch (a multiple of 16); dtype: the 16-bit compute dtype (scales, branch, activations), bfloat16 as
    Nunchaku's FLUX models.

        NunchakuOptions(algo="svdquant", rank=32)
    """
    algo: str = "svdquant"
    dtype: str = "bfloat16"
    precision: str = "int4"
    rank: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 4:
            raise TargetError(f"--bits {self.bits}: Nunchaku's W4A4 layout holds 4-bit weights; use --bits 4")
        if self.group_size not in (None, GROUP_SIZE):
            raise TargetError(f"--group-size {self.group_size}: Nunchaku's INT4 kernels take groups of "
                              f"{GROUP_SIZE} only")
        if self.precision not in PRECISIONS:
            raise TargetError(f"--precision {self.precision}: dcc writes Nunchaku's {', '.join(PRECISIONS)} "
                              f"checkpoints (nvfp4 is not done yet)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 16 or self.rank % 16:
            raise TargetError(f"--rank {self.rank}: the low-rank branch's rank is a multiple of 16 (Nunchaku pads "
                              f"it so), at least 16")


def _decode(tensors, prefix: str, entry: dict) -> torch.Tensor:
    """The main branch the kernel multiplies (codes * scales, in the smoothed basis), exact in float32."""
    n, k = entry["shape"]
    t = unpack_linear({name: tensors.get(f"{prefix}.{name}") for name in TENSORS}, n, k)
    return decode_int4_weight(t["codes"], t["scales"]).float()


def _reference(tensors: dict, n: int, k: int, bias) -> NunchakuLinear:
    t = unpack_linear(tensors, n, k)
    return NunchakuLinear("int4", t["codes"], t["scales"], t["smooth"], t["lora_down"], t["lora_up"], t["bias"],
                          dtype=t["scales"].dtype)


@register_target
class Nunchaku(Target):
    name = "nunchaku"
    engine_name = "Nunchaku"
    summary = "Nunchaku W4A4 + low-rank branch (SVDQuant: int4 codes and scales per 64, smooth, lora_down/up)"
    Options = NunchakuOptions
    algos = ALGOS
    formats = {FORMAT: Format(FORMAT, TENSORS, _decode, decoded_dtype=torch.float32, reference=_reference)}

    def spec(self, opts):
        return weight_spec(opts.precision, opts.dtype)

    def pipeline(self, opts):
        return pipeline(opts.algo, opts.rank)

    def assigner(self, opts, spec):
        return make_spec_assigner(spec, f"{opts.precision}:{opts.dtype}", opts.unsupported)

    def preflight(self, lm, spec, opts):
        return preflight(lm, opts.unsupported)

    def emitter(self, writer, opts):
        return NunchakuEmitter(writer, getattr(torch, opts.dtype))

    def engines(self, spec, emitter):
        return ["dcc-runtime"]   # Nunchaku's engine runs diffusion transformers, not causal LMs

    def runtime(self, opts, emitter) -> dict:
        return {"activations": f"{opts.precision} per token and {GROUP_SIZE}-group ({opts.dtype} scales)",
                "kv_bits": None, "kv_cache": {}}

    def hf_config(self, lm, spec, opts, emitter) -> dict:
        cfg = to_hf4(lm.config.to_dict(), opts.dtype)
        cfg["tie_word_embeddings"] = bool(emitter.tied)
        cfg["quantization_config"] = {
            "quant_method": "svdquant", "format": FORMAT, "producer": "dcc",
            "weight": {"dtype": opts.precision, "group_size": GROUP_SIZE}, "rank": opts.rank,
            "modules_in_16bit": sorted(k for k, v in emitter.layers.items() if "skip_reason" in v),
        }
        return cfg
