"""CPU reference execution of an artifact: a transformers model (built by the adapter of the model kind the manifest
records: causal LM or encoder) or the diffusers class its config names (a diffusion transformer or UNet), whose
quantized linears carry the decoded weights (where the engine's kernel computes with a reconstructed 16-bit weight)
or are the format's reference module (where it does not: e.g. int8 activations, an integer GEMM and an fp16
epilogue), its blocks (every block list of a diffusion model) run as their captured graphs with the KV cache
quantization the manifest records (runtime/graph_blocks.py), in float32 on the CPU. Formats come from the target
registry; an artifact whose layers live in an engine's own file (a Nunchaku single file) is read back to the source
model's names by its target (Target.read_back), its split linears split again in each block's graph."""
from __future__ import annotations

import torch

from ..ir.fused_linear import split_linears
from ..models.adapter import artifact_adapter
from ..models.loader import rebuild_buffers
from ..targets.base import Target, TargetError, get_target
from .artifact import Artifact, ArtifactError
from .graph_blocks import run_blocks_as_graphs


def _target(art: Artifact):
    try:
        return get_target(art.manifest.get("target", ""))
    except TargetError:
        return None


def read_back(art: Artifact):
    """The artifact's layers under the source model's names (targets.base.ReadBack) where its target stores them
    otherwise (a Nunchaku single file: fused, split and renamed layers); None for a dcc-named artifact."""
    target = _target(art)
    return None if target is None else target.read_back(art)


def _refusal(art: Artifact, stored: str) -> ArtifactError:
    return ArtifactError(f"{art.path}: its layers are stored in the engine's own file (e.g. {stored} lives in "
                         f"{art.manifest['layers'][stored]['stored'].get('prefix')}), which its target "
                         f"{art.manifest.get('target')!r} cannot read back for dcc's CPU reference")


def check_rebuildable(art: Artifact) -> None:
    """An artifact whose layers live in an engine's own file (the manifest's "stored" entries) is rebuilt through its
    target's read-back (Target.read_back); one whose target has none is refused in one line (cheap: nothing is
    read)."""
    stored = next((k for k, v in art.manifest["layers"].items() if "stored" in v), None)
    target = _target(art)
    if stored is not None and (target is None or type(target).read_back is Target.read_back):
        raise _refusal(art, stored)


def build_model(art: Artifact, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Instantiate the artifact's architecture and fill it: decoded weights for quantized layers, stored tensors
    for the rest (16-bit values, computed in compute_dtype)."""
    stored = next((k for k, v in art.manifest["layers"].items() if "stored" in v), None)
    rb = read_back(art) if stored is not None else None
    if stored is not None and rb is None:
        raise _refusal(art, stored)
    adapter = artifact_adapter(art.manifest)
    keys = set(art.tensors.keys())
    block_lists = None   # a transformers model: the one list find_blocks finds
    if adapter.kind == "diffusers":
        config, model = adapter.artifact_model(art.path, art.config, compute_dtype)
        block_lists = (art.manifest.get("source") or {}).get("block_lists") or adapter.block_lists(model)
    else:
        from transformers import AutoConfig

        cfg_dict = dict(art.config)
        cfg_dict.pop("quantization_config", None)
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items()
                                                     if k != "transformers_version"})
        model = adapter.build(config, compute_dtype, keys=keys)
        # fused linears the compile split into their parts (Phi-3's qkv_proj): the artifact holds the parts
        split_linears(model, (art.manifest.get("source") or {}).get("split_linears") or {})
    if rb is not None:
        _fill_from_read_back(model, art, rb, compute_dtype, device)
        _restore_buffers(model, config, device)
        run_blocks_as_graphs(model, art.manifest.get("runtime", {}).get("kv_cache") or {}, block_lists,
                             splits=rb.splits)
        return model.to(device)
    tied = getattr(config, "tie_word_embeddings", False)   # (a diffusers config has no such key)
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
            elif tied and _is_head(model, p):
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
    if tied and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _restore_buffers(model, config, device)
    target = _target(art)
    if target is not None:
        target.prepare_reference(model, art)   # ops the engine fuses with its activation quantization
    # every block runs as its graph; where the engine's cache is quantized, K/V reach attention through dcc::quant_kv
    run_blocks_as_graphs(model, art.manifest.get("runtime", {}).get("kv_cache") or {}, block_lists)
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


def _fill_from_read_back(model, art, rb, compute_dtype, device) -> None:
    """Fill the model from a target's read-back: its modules swapped in (split parts registered beside the linear
    they split), every other parameter from its tensors; the split linears' own parameters, which the block graph
    no longer reads, are zeros."""
    for path, mod in rb.modules.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, mod)
    swapped = set(rb.modules)
    used = set()
    for mname, mod in model.named_modules():
        if mname in swapped or any(mname.startswith(s + ".") for s in swapped):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if full in rb.tensors:
                t = rb.tensors[full]
                used.add(full)
            elif mname in rb.splits:
                t = torch.zeros(p.shape)
            else:
                raise ValueError(f"{art.path}: tensor {full} missing from the artifact (read back by its target)")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{art.path}: tensor {full} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            mod._parameters[pname] = torch.nn.Parameter(t.to(compute_dtype).to(device), requires_grad=False)
    extra = sorted(set(rb.tensors) - used - set(rb.optional))
    if extra:
        raise ValueError(f"{art.path}: tensor {extra[0]} (read back) has no place in {type(model).__name__}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _restore_buffers(model, config, device) -> None:
    for path, mod in model.named_modules():
        metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if metas:
            rebuild_buffers(mod, config, device, metas, path)
