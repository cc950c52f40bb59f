"""The QServe target's face to the compiler: spec, pipeline, layer rule, emitter and config for given options."""
from __future__ import annotations

from .emit import QServeEmitter as Emitter, format_of
from .pipeline import make_spec_assigner, pipeline, preflight, weight_spec  # noqa: F401  (re-exported)

QSERVE_MODEL_TYPES = ("llama", "mistral")   # the decoder families QServe's engine builds (qserve/modeling/models)
DEFAULT_GROUP_SIZE = 0   # per channel: QServe's layout for any K that is a multiple of 32


def kv_bits_for(opts) -> int | None:
    """'auto': a 4-bit cache for W4A8 (QoQ), 16-bit for W8A8 (SmoothQuant)."""
    kv = getattr(opts, "kv_bits", "auto")
    if kv == "auto":
        return 4 if opts.bits == 4 else None
    kv = int(kv)
    return None if kv == 16 else kv


def group_size_for(opts) -> int:
    return DEFAULT_GROUP_SIZE if opts.group_size is None else opts.group_size


def spec_for(opts):
    if opts.dtype != "float16":
        raise ValueError(f"--dtype {opts.dtype}: QServe's kernels take fp16 activations and scales; use --dtype float16")
    return weight_spec(opts.bits, group_size_for(opts))


def steps_for(opts):
    return pipeline(opts.algo, opts.bits, group_size_for(opts), kv_bits_for(opts))


def assigner_for(opts, spec):
    return make_spec_assigner(spec, opts.unsupported, kv_bits_for(opts))


def engines_for(spec, emitter=None) -> list[str]:
    """QServe's loader takes per channel and g128 Llama/Mistral checkpoints with every linear quantized; dcc's
    runtime takes every artifact of this target. Shapes its GEMM tiles do not cover are reported as kernel notes
    (config.json and the compile log), not hidden."""
    qserve_ok = spec.bits == 8 or spec.group_size in (0, 128)
    if emitter is not None:
        qserve_ok = qserve_ok and emitter.model_type in QSERVE_MODEL_TYPES
        qserve_ok = qserve_ok and not any("skip_reason" in v for v in emitter.layers.values())
    return ["qserve", "dcc-runtime"] if qserve_ok else ["dcc-runtime"]


def hf_config(lm, spec, opts, emitter) -> dict:
    """The source config with fp16, the tie flag and a quantization_config saying what the tensors are."""
    cfg = lm.config.to_dict()
    cfg["dtype"] = "float16"
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
