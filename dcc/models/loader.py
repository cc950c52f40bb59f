"""Lazy loading of a local Hugging Face model: the skeleton lives on the meta device and one module's weights at a
time are read from the safetensors shards (or a GGUF file, converted once to such a folder)."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..compiler.host_memory import release_free_pages


class ModelLoadError(ValueError):
    """A model folder, file or tensor that cannot be used; the message names it."""


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A folder with config.json + *.safetensors, or a .gguf file (converted once into a cached folder)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p}: expected a Hugging Face folder or a .gguf file")
        from .gguf import cached_gguf_to_hf
        return Path(cached_gguf_to_hf(p))
    from .checks import check_not_artifact
    check_not_artifact(p)   # before the file checks: an artifact looks like a model folder but is not one
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: no config.json (not a Hugging Face model folder)")
    if not list(p.glob("*.safetensors")):
        bins = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found {bins[0]}: convert it to safetensors; dcc does not unpickle weights)" if bins else ""
        raise ModelLoadError(f"{p}: no *.safetensors weights{hint}")
    return p


class TensorIndex:
    """Where each tensor of a folder lives; opens shards on demand and checks every tensor it reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key_to_file: dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if not index.is_file():   # diffusers names its index after its weights
            index = folder / "diffusion_pytorch_model.safetensors.index.json"
        files = sorted(folder.glob("*.safetensors"))
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index}: unreadable index ({e})") from None
            self.key_to_file = {k: folder / v for k, v in wm.items()}
        else:
            for f in files:
                for k in self._open(f).keys():
                    self.key_to_file[k] = f
        self._handles: dict[Path, object] = {}
        self._stored: dict[str, str] = {}   # name as the model knows it -> name in the file, where they differ

    def strip_prefix(self, prefix: str) -> None:
        """Answer to the names without `prefix` ('bert.embeddings.x' as 'embeddings.x'); names without it stay."""
        renamed = {k[len(prefix):]: k for k in self.key_to_file if k.startswith(prefix)}
        self.key_to_file = {**{k: f for k, f in self.key_to_file.items() if not k.startswith(prefix)},
                            **{new: self.key_to_file[old] for new, old in renamed.items()}}
        self._stored.update(renamed)

    @staticmethod
    def _open(f: Path):
        if not f.is_file():
            raise ModelLoadError(f"{f}: missing safetensors shard")
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncation/corruption
            raise ModelLoadError(f"{f}: not a valid safetensors file ({str(e).splitlines()[0]})") from None

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def close(self) -> None:
        """Drop the shards' memory maps: the pages read so far leave this process's resident memory."""
        self._handles.clear()

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(f)
        return h

    def header(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name such as 'BF16' or 'I8', shape) of a tensor, from the file's header only."""
        f, key = self.key_to_file[key], self._stored.get(key, key)
        try:
            s = self._handle(f).get_slice(key)
            return s.get_dtype(), tuple(s.get_shape())
        except Exception as e:
            raise ModelLoadError(f"{f}: tensor {key} cannot be read ({str(e).splitlines()[0]})") from None

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        f, key = self.key_to_file[key], self._stored.get(key, key)
        h = self._handle(f)
        try:
            t = h.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{f}: tensor {key} cannot be read ({str(e).splitlines()[0]})") from None
        # torch has no isfinite for the 1-byte floats (fp8 micro-scales): check them widened (exact)
        finite = (lambda v: torch.isfinite(v.float() if v.element_size() == 1 else v))   # noqa: E731
        if t.is_floating_point() and not finite(t).all():
            bad = int((~finite(t)).sum())
            raise ModelLoadError(f"{f}: tensor {key} has {bad} NaN/inf values")
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The repeated units: the longest ModuleList whose children all share one class (no per-architecture table)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if len({type(c) for c in mod}) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ModelLoadError(f"{type(model).__name__}: found no repeated blocks (no ModuleList of one module class)")
    return best


_DONORS: dict[int, torch.nn.Module] = {}


def _donor(config) -> torch.nn.Module:
    """A real (CPU) model of the same config with one block and a 16-token vocabulary: its buffers are the ones a
    full construction would compute, at the cost of a tiny allocation."""
    if id(config) not in _DONORS:
        from .adapter import adapter_for
        small = copy.deepcopy(config)
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(small, attr):
                setattr(small, attr, 1)
        if hasattr(small, "layer_types") and isinstance(small.layer_types, list):
            small.layer_types = small.layer_types[:1]
        small.vocab_size = 16
        _DONORS[id(config)] = adapter_for(small).build(small, device="cpu")
    return _DONORS[id(config)]


def rebuild_buffers(mod: torch.nn.Module, config, device, names: list[str], path: str = "") -> None:
    """Non-persistent buffers (RoPE inv_freq, Gemma's embed_scale) are computed at construction, so a model built on
    the meta device lacks them: rebuild the module for real (or take it from a one-block donor model, for modules
    whose constructor does not take the config) and copy its buffers and derived attributes."""
    try:
        fresh = type(mod)(config=config)
    except TypeError:
        donor_path = re.sub(r"\.(\d+)(\.|$)", r".0\2", path)   # block i -> the donor's block 0
        fresh = _donor(config).get_submodule(donor_path)
    for n in names:
        mod._buffers[n] = fresh._buffers[n].to(device)
    for k, v in vars(fresh).items():
        if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module)):
            setattr(mod, k, v)


class LazyModel:
    """A transformers or diffusers model, built by its kind's adapter (self.adapter: dcc.models.adapter), whose
    parameters are materialised per module prefix and released afterwards. Its blocks: `blocks` (the modules) at
    `block_prefix(i)`; for a transformers model the one ModuleList at `blocks_prefix`, for a diffusers model every
    list find_block_lists finds (`block_lists`), `blocks_prefix` naming them all."""
    pipeline_path = None   # a diffusers pipeline folder, when the model is its transformer/ or unet/

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoConfig
        from . import checks
        from .diffusers_folder import is_diffusers_folder

        self.dtype, self.device = dtype, torch.device(device)
        if is_diffusers_folder(Path(path)):
            from .diffusers_loading import load_diffusers
            load_diffusers(self, Path(path))
            return
        self.path = resolve_model_path(path)
        checks.check_no_remote_code(self.path)   # before transformers reads the folder: it would offer to run it
        try:
            self.config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(f"{self.path / 'config.json'}: {str(e).splitlines()[0]}") from None
        self.adapter = checks.check_config(self.path, self.config)
        self.index = TensorIndex(self.path)
        self.model = self.adapter.build(self.config, dtype, keys=self.index.keys())
        # a head model's checkpoint (bert.* of BertForMaskedLM) read into the base model the adapter builds
        self.key_prefix = self.adapter.checkpoint_prefix(self.model, self.index.keys())
        if self.key_prefix:
            self.index.strip_prefix(self.key_prefix)
        checks.check_skeleton(self.path, self.config, self.model)
        self.blocks_prefix, self.blocks = find_blocks(self.model)
        self.block_lists = [self.blocks_prefix]
        self.tied = self._tied_keys()
        # every tensor's name, dtype and shape from the headers, so a mismatch stops before any compile work
        checks.check_tensors(self.path, self.model, self.index, self.tied)
        self.index.close()

    def _tied_keys(self) -> dict[str, str]:
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        if not isinstance(tied, dict) or not getattr(self.config, "tie_word_embeddings", False):
            return {}
        return {k: v for k, v in tied.items() if k not in self.index.key_to_file}

    def block_prefix(self, i: int) -> str:
        prefixes = getattr(self, "block_prefixes", None)
        return prefixes[i] if prefixes is not None else f"{self.blocks_prefix}.{i}"

    def in_blocks(self, name: str) -> bool:
        """Whether a module or tensor name lies inside one of the block lists."""
        return any(name == r or name.startswith(r + ".") for r in self.block_lists)

    def materialize(self, prefix: str) -> torch.nn.Module:
        """Read every parameter/buffer under `prefix` ('' = everything outside the blocks) onto the device."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        loaded: dict[str, torch.nn.Parameter] = {}
        for name, mod in module.named_modules():
            full = f"{prefix}.{name}".strip(".") if name else prefix
            if not prefix and self.in_blocks(full):
                continue
            for pname, param in list(mod.named_parameters(recurse=False)):
                key = f"{full}.{pname}".lstrip(".")
                src = self.tied.get(key, key)
                if src in loaded:   # a tied weight (head = embeddings): one tensor, shared as in transformers
                    mod._parameters[pname] = loaded[src]
                    continue
                if src not in self.index.key_to_file:
                    raise ModelLoadError(f"{self.path}: tensor {key} missing from the checkpoint")
                t = self.index.get(src, self.dtype).to(self.device)
                if tuple(t.shape) != tuple(param.shape):
                    raise ModelLoadError(
                        f"{self.path}: tensor {src} has shape {tuple(t.shape)}, the config expects {tuple(param.shape)}")
                mod._parameters[pname] = loaded[src] = torch.nn.Parameter(t, requires_grad=False)
            self._restore_buffers(full, mod)
        self.index.close()   # keep only the copies, not the mapped shards, resident
        return module

    def _restore_buffers(self, full: str, mod: torch.nn.Module) -> None:
        metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            return
        keys = [f"{full}.{n}".lstrip(".") for n in metas]
        if all(k in self.index.key_to_file for k in keys):
            for n, k in zip(metas, keys):
                mod._buffers[n] = self.index.get(k).to(self.device)
            return
        try:
            rebuild_buffers(mod, self.config, self.device, metas, full)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot rebuild buffers {keys} of {full} ({e})") from None

    def release(self, prefix: str) -> None:
        """Drop a module's tensors (back to meta) and hand the freed pages back to the system, so memory stays one
        block at a time (compiler/host_memory.py: without the trim the allocator's holes grow with the depth)."""
        module = self.model.get_submodule(prefix)
        module.to("meta")
        release_free_pages()

    @contextlib.contextmanager
    def streamed(self):
        """The whole model, to be called as usual, with only the parts outside the blocks resident: each block is
        read just before it runs and released after (peak memory: those parts plus one block)."""
        self.materialize("")
        hooks = []
        for i, block in enumerate(self.blocks):
            p = self.block_prefix(i)
            hooks.append(block.register_forward_pre_hook(lambda m, a, p=p: self.materialize(p) and None))
            hooks.append(block.register_forward_hook(lambda m, a, o, p=p: self.release(p)))
        try:
            yield self.model
        finally:
            for h in hooks:
                h.remove()

    def materialize_all(self) -> torch.nn.Module:
        self.materialize("")
        for i in range(len(self.blocks)):
            self.materialize(self.block_prefix(i))
        return self.model
