"""Refusals made before any compile work: a model folder that would run its own Python code, a dcc artifact given as
the source, a model dcc cannot compile (of a kind no adapter takes, mixture-of-experts, quantized weights), and a
checkpoint whose tensors do not match transformers' skeleton. Each is one line naming the folder, file or tensor;
only JSON files and safetensors headers are read, never tensor data."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .loader import ModelLoadError, TensorIndex

# Files whose `auto_map` makes transformers import Python shipped with the model (model classes; the tokenizer).
CODE_CONFIGS = ("config.json", "tokenizer_config.json")
# Config fields that count a model's experts (Mixtral, Qwen-MoE/OLMoE, DeepSeek, ...): more than one means MoE.
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
FLOAT_DTYPES = ("F", "BF")   # safetensors dtype names: F16, BF16, F32, F64, F8_E4M3, ...; not I8, U8, I32, BOOL


def _json(path: Path) -> dict | None:
    """The file's top-level object, or None when absent or unreadable (transformers reports bad JSON itself)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check_no_remote_code(folder: Path) -> None:
    """dcc never runs code shipped with a model: refuse a folder whose config or tokenizer config has an auto_map,
    before transformers sees it (it would offer to import those files)."""
    for name in CODE_CONFIGS:
        auto_map = (_json(folder / name) or {}).get("auto_map")
        if not auto_map:
            continue
        if not isinstance(auto_map, dict):   # an older form: a bare list of classes
            auto_map = {"AutoTokenizer" if name.startswith("tokenizer") else "AutoModel": auto_map}
        # name the model class when there is one: that is the code that would run the network
        key = next((k for k in auto_map if k != "AutoConfig"), next(iter(auto_map)))
        ref = auto_map[key]
        ref = ", ".join(r for r in ref if r) if isinstance(ref, list) else ref
        raise ModelLoadError(f"{folder / name}: auto_map entry {key} -> {ref} would run Python code shipped with the "
                             f"model; dcc never runs model code (use a model whose architecture transformers ships)")


def check_not_artifact(folder: Path) -> None:
    """A dcc artifact has a config and safetensors like a source model, but its linears are packed codes."""
    manifest = _json(folder / "dcc.json")
    if manifest is None or manifest.get("format") != "dcc-artifact":
        return
    source = (manifest.get("source") or {}).get("model", "unknown")
    raise ModelLoadError(f"{folder} is a dcc artifact (target {manifest.get('target', 'unknown')}), not a source "
                         f"model: compile from the model it was made from (its source: {source})")


def describe(config) -> str:
    """'MixtralForCausalLM (model_type mixtral)': the class the folder names, else the causal LM class transformers
    would build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return f"{name} (model_type {config.model_type})" if name else f"model_type {config.model_type}"


def check_quantization_config(folder: Path, config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else getattr(qc, "quant_method", "unknown")
        raise ModelLoadError(f"{folder / 'config.json'}: quantization_config (quant_method {method}) says the weights "
                             f"are already quantized; dcc needs floating-point source weights")


def _moe_refusal(folder: Path, config) -> ModelLoadError:
    return ModelLoadError(f"{folder}: {describe(config)} is a mixture-of-experts model; dcc does not compile MoE "
                          f"models yet (their experts are not plain linear layers)")


def check_not_moe_config(folder: Path, config) -> None:
    for attr in EXPERT_COUNTS:
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 1:
            raise _moe_refusal(folder, config)


def check_config(folder: Path, config):
    """Everything decided from config.json alone, before the skeleton is built; returns the model's adapter (a
    model that is neither a causal LM nor an encoder is refused there)."""
    from .adapter import adapter_for
    check_quantization_config(folder, config)
    adapter = adapter_for(config, folder)
    check_not_moe_config(folder, config)
    return adapter


def check_skeleton(folder: Path, config, model: torch.nn.Module) -> None:
    """Experts that no config field counts still show in the module tree (fused expert tensors, routers)."""
    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        kind = type(mod).__name__.lower()
        if leaf == "experts" or "experts" in kind or "moe" in kind:
            raise _moe_refusal(folder, config)


def check_tensors(folder: Path, model: torch.nn.Module, index: TensorIndex, tied: dict[str, str],
                  library: str = "transformers") -> None:
    """The checkpoint holds a floating-point tensor of the skeleton's shape for every parameter (tied ones aside),
    read from the safetensors headers only. library: whose class the skeleton is (named in the messages)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    _check_names(folder, model, index, [k for k in params if k not in tied], library)
    for name, p in params.items():
        key = tied.get(name, name)
        if not index.key_to_file[key].is_file():
            continue   # a shard the index names but that is gone: named when its block is read
        dtype, shape = index.header(key)
        if not dtype.startswith(FLOAT_DTYPES):
            raise ModelLoadError(f"{index.key_to_file[key]}: tensor {key} is {dtype}; dcc needs floating-point source "
                                 f"weights (this checkpoint looks already quantized)")
        if shape != tuple(p.shape):
            raise ModelLoadError(f"{folder}: tensor {key} has shape {shape}, the config expects {tuple(p.shape)}")


def _check_names(folder: Path, model: torch.nn.Module, index: TensorIndex, expected: list[str],
                 library: str = "transformers") -> None:
    """One lost tensor is a damaged file; many are another naming: then show what the file's names look like."""
    have = set(index.keys())
    missing = [k for k in expected if k not in have]
    if not missing:
        return
    arch = type(model).__name__
    if len(missing) == 1:
        raise ModelLoadError(f"{folder}: tensor {missing[0]} missing from the checkpoint (1 of the {len(expected)} "
                             f"that {library}' {arch} expects)")
    known = set(expected) | {n for n, _ in model.named_buffers()}
    unknown = sorted(k for k in have if k not in known)
    hint = f"; the file's names look like {unknown[0]!r}" if unknown else "; the file has no other tensors"
    raise ModelLoadError(f"{folder}: the checkpoint does not match {library}' {arch}: {len(missing)} of "
                         f"{len(expected)} tensors missing (first: {missing[0]}){hint}")
