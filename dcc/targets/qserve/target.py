"""The QServe target (W4A8KV4 QoQ and W8A8 SmoothQuant, research/targets.md 1A): its options, pipelines, spec rule,
emitter, config, formats and loader checks, registered under the name "qserve"."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Format, Target, TargetError, TargetOptions, register_target
from ..common.hf4_config import to_hf4
from . import engine_config, loader_spec, reference
from .emit import QServeEmitter, format_of
from .pipeline import ALGOS, GROUP_SIZES, make_spec_assigner, pipeline, preflight, weight_spec

QSERVE_MODEL_TYPES = ("llama", "mistral")   # the decoder families QServe's engine builds (qserve/modeling/models)
DEFAULT_GROUP_SIZE = 0   # per channel: QServe's layout for any K that is a multiple of 32


@dataclass(frozen=True)
class QServeOptions(TargetOptions):
    """algo: qoq | qoq-rtn | gptq | rtn | smoothquant; bits: 4 (W4A8) or 8 (W8A8); group_size: 0 = per channel
    (default), 128 (QServe's g128 kernel) or 64 (dcc's runtime); kv_bits: auto | 4 | 8 | 16 (auto: 4 for W4A8, 16
    for W8A8); dtype: float16 only (QServe's kernels take fp16).

        QServeOptions(algo="qoq", group_size=128)
    """
    algo: str = "qoq"
    kv_bits: str | int = "auto"

    def __post_init__(self):
        super().__post_init__()   # the algorithm is checked by Target.options
        if self.dtype != "float16":
            raise TargetError(f"--dtype {self.dtype}: QServe's kernels take fp16 activations and scales; use "
                              f"--dtype float16")
        if self.bits not in (4, 8):
            raise TargetError(f"--bits {self.bits}: qserve takes 4-bit (W4A8) or 8-bit (W8A8) weights")
        if str(self.kv_bits) not in ("auto", "4", "8", "16"):
            raise TargetError(f"--kv-bits {self.kv_bits}: use auto, 4, 8 or 16")
        if self.algo == "smoothquant" and self.bits != 8:
            raise TargetError("--algo smoothquant is the W8A8 recipe: use --bits 8 (or --algo qoq for W4A8)")
        gs = self.group_size
        if self.bits == 8 and gs not in (None, 0):
            raise TargetError(f"--group-size {gs}: qserve W8A8 is per channel; use --group-size 0")
        if gs is not None and gs not in GROUP_SIZES:
            raise TargetError(f"--group-size {gs}: qserve W4A8 takes 0 (per channel) or 128 (64: dcc's runtime "
                              f"only)")

    @property
    def kv(self) -> int | None:
        """KV cache bits the engine applies: None = 16-bit; 'auto': 4 for W4A8 (QoQ), 16 for W8A8 (SmoothQuant)."""
        if self.kv_bits == "auto":
            return 4 if self.bits == 4 else None
        return None if int(self.kv_bits) == 16 else int(self.kv_bits)

    @property
    def gs(self) -> int:
        return DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size


def _formats() -> dict[str, Format]:
    out = {}
    for fmt, names in reference.TENSORS.items():
        # QServe's GEMM applies the scales to integers and never forms a 16-bit weight: the checksum is of float32
        out[fmt] = Format(fmt, names, reference.decode, decoded_dtype=torch.float32,
                          reference=lambda tensors, n, k, bias, fmt=fmt: reference.QServeLinear(fmt, tensors, n, k,
                                                                                                bias))
    return out


@register_target
class QServe(Target):
    name = "qserve"
    engine_name = "QServe"
    summary = "QServe W4A8KV4 (QoQ; per channel or progressive g128) or W8A8 with --bits 8"
    Options = QServeOptions
    algos = ALGOS
    formats = _formats()
    cuda_extension = "w4a8"

    def spec(self, opts):
        return weight_spec(opts.bits, opts.gs)

    def pipeline(self, opts):
        return pipeline(opts.algo, opts.bits, opts.gs, opts.kv)

    def assigner(self, opts, spec):
        return make_spec_assigner(spec, opts.unsupported, opts.kv)

    def preflight(self, lm, spec, opts):
        kind = getattr(getattr(lm, "adapter", None), "kind", "causal-lm")
        if kind != "causal-lm":
            raise TargetError(f"{lm.path}: a {kind} model; QServe's engine serves decoder-only causal LMs (its KV "
                              f"cache, rotation and smoothing assume one): use --target tinychat")
        # refused, not kept for dcc's runtime alone: an artifact of this target is one QServe would load and run
        # with wrong positions (its RoPE kernels apply plain rope_theta only: engine_config.py)
        problem = engine_config.rope_problem(lm.config.to_dict())
        if problem:
            raise TargetError(f"{lm.path.name}: target qserve refuses this model: {problem}")
        return preflight(lm, spec, opts.unsupported)

    def emitter(self, writer, opts):
        return QServeEmitter(writer, torch.float16)

    def engines(self, spec, emitter) -> list[str]:
        """QServe's loader takes per channel and g128 Llama/Mistral checkpoints with every linear quantized, whose
        config its model builds right (loader_spec.config_problems); dcc's runtime takes every artifact of this
        target. Shapes its GEMM tiles do not cover are reported as kernel notes (config.json and the compile log),
        not hidden."""
        ok = spec.bits == 8 or spec.group_size in (0, 128)
        ok = ok and emitter.model_type in QSERVE_MODEL_TYPES
        ok = ok and not any("skip_reason" in v for v in emitter.layers.values())
        if ok and emitter.source_config is not None:
            ok = not loader_spec.config_problems(emitter.source_config, format_of(spec), spec.group_size)
        return ["qserve", "dcc-runtime"] if ok else ["dcc-runtime"]

    def hf_config(self, lm, spec, opts, emitter) -> dict:
        """The source config in the form QServe's transformers (4.37.2) reads (rope_theta, rope_scaling,
        torch_dtype float16: engine_config.py), with the tie flag and a quantization_config saying what the tensors
        are."""
        cfg = to_hf4(lm.config.to_dict(), "float16")
        cfg["tie_word_embeddings"] = bool(emitter.tied)
        cfg["quantization_config"] = {
            "quant_method": "qserve", "format": format_of(spec), "producer": "dcc",
            "bits": spec.bits, "group_size": spec.group_size if spec.group_size > 0 else -1,
            "activation": "int8 per token (dynamic, symmetric)",
            "kv_cache_bits": emitter.kv_bits or 16,
            "modules_in_16bit": sorted(k for k, v in emitter.layers.items() if "skip_reason" in v),
            "kernel_notes": emitter.kernel_notes[:20],
        }
        return cfg

    def runtime(self, opts, emitter) -> dict:
        return {"activations": "int8-per-token", "kv_bits": emitter.kv_bits, "kv_cache": emitter.kv_cache}

    def check_artifact(self, art) -> list[str]:
        spec = next((e["spec"] for e in art.quantized_layers().values()), {})
        fmt = art.config["quantization_config"]["format"]
        return loader_spec.check(art.tensors, art.config, fmt, spec.get("group_size", 0))

    def prepare_reference(self, model, art):
        # an artifact QServe's engine runs (Llama / Mistral): its fused norm + quant and silu_and_mul
        # (numerics_fused.py); one only dcc's runtime takes keeps the model's own norms and activations
        if "qserve" in (art.manifest.get("engines") or []):
            reference.use_engine_kernels(model)

    def fast_decoder(self):
        from .fastlm import QServeFast
        return QServeFast()

    def cuda_model(self, art, device="cuda"):
        from .cuda import build_qserve_cuda_model
        return build_qserve_cuda_model(art, device)

    def check_exact_cuda(self, art, device="cuda", kernels=None):
        from ...runtime.validate import check_exact
        from .cuda import check_layers_cuda
        exact, k = check_exact(art), check_layers_cuda(art, device)
        if kernels is not None:
            kernels.update(k)
        return {name: ok and k[name]["ok"] for name, ok in exact.items()}
