"""CPU reference execution of an artifact: a transformers model (built by the adapter of the model kind the manifest
records: causal LM or encoder) whose quantized linears carry the decoded weights (where the engine's kernel computes
with a reconstructed 16-bit weight) or are the format's reference module (where it does not: e.g. int8 activations,
an integer GEMM and an fp16 epilogue), its blocks run as their captured graphs with the KV cache quantization the
manifest records (runtime/graph_blocks.py), in float32 on the CPU. Formats come from the target registry."""
from __future__ import annotations

import torch

from ..models.adapter import artifact_adapter
from ..models.loader import rebuild_buffers
from .artifact import Artifact
from .graph_blocks import run_blocks_as_graphs


def build_model(art: Artifact, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Instantiate the artifact's architecture and fill it: decoded weights for quantized layers, stored tensors
    for the rest (16-bit values, computed in compute_dtype)."""
    from transformers import AutoConfig

    cfg_dict = dict(art.config)
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items() if k != "transformers_version"})
    keys = set(art.tensors.keys())
    model = artifact_adapter(art.manifest).build(config, compute_dtype, keys=keys)
    quant = art.quantized_layers()
    used = {f"{q}.{t}" for q in quant for t in art.format_of(q).tensors}
    swapped = set()
    for mname, e in quant.items():
        if art.format_of(mname).reference is not None:
            _swap_in(model, art, mname, e, used)
            swapped.add(mname)
    for mname, mod in model.named_modules():
        if mname in swapped:
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "weight" and mname in quant:
                t = art.decode(mname)
            elif full in keys:
                t = art.tensors.get(full)
                used.add(full)
            elif config.tie_word_embeddings and _is_head(model, p):
                continue   # tied: filled from the embeddings below
            else:
                raise ValueError(f"{art.path}: tensor {full} missing from the artifact")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{art.path}: tensor {full} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            mod._parameters[pname] = torch.nn.Parameter(t.to(compute_dtype).to(device), requires_grad=False)
    extra = sorted(keys - used)
    if extra:
        raise ValueError(f"{art.path}: tensor {extra[0]} has no place in {type(model).__name__}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _restore_buffers(model, config, device)
    # every block runs as its graph; where the engine's cache is quantized, K/V reach attention through dcc::quant_kv
    run_blocks_as_graphs(model, art.manifest.get("runtime", {}).get("kv_cache") or {})
    return model.to(device)


def _is_head(model, p) -> bool:
    head = model.get_output_embeddings()
    return head is not None and p is head.weight


def _swap_in(model, art, mname: str, entry: dict, used: set) -> None:
    """Replace nn.Linear `mname` by its format's reference layer built from its stored tensors."""
    parent, _, attr = mname.rpartition(".")
    old = model.get_submodule(mname)
    n, k = entry["shape"]
    fmt = art.format_of(mname)
    try:
        tensors = {t: art.tensors.get(f"{mname}.{t}") for t in fmt.tensors}
    except KeyError as e:
        raise ValueError(f"{art.path}: layer {mname} is missing tensor {e}") from None
    bias = None
    if old.bias is not None:
        bias = art.tensors.get(f"{mname}.bias")
        used.add(f"{mname}.bias")
    setattr(model.get_submodule(parent), attr, fmt.reference(tensors, n, k, bias))


def _restore_buffers(model, config, device) -> None:
    for path, mod in model.named_modules():
        metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if metas:
            rebuild_buffers(mod, config, device, metas, path)
