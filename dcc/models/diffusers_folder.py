"""A local diffusers model folder as dcc reads it: a transformer or UNet folder (config.json naming its class in
"_class_name", diffusion_pytorch_model*.safetensors, sharded with an index) or a pipeline folder (model_index.json,
whose transformer/ or unet/ is the model compiled). The skeleton is diffusers' own class -- only one that the
diffusers package ships, never code from the folder -- built with its parameters on the meta device."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .loader import ModelLoadError

DENOISERS = ("transformer", "unet")   # the pipeline components dcc compiles, in the order they are looked for


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return doc


def is_diffusers_folder(p: Path) -> bool:
    """A pipeline folder (model_index.json) or a model folder whose config.json names a diffusers class."""
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "_class_name" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def resolve(p: Path) -> tuple[Path, Path | None]:
    """(the model folder, the pipeline folder or None): a pipeline's transformer/ or unet/."""
    if not (p / "model_index.json").is_file():
        return p, None
    index = _json(p / "model_index.json")
    for name in DENOISERS:
        if name in index and (p / name).is_dir():
            return p / name, p
    listed = [k for k, v in index.items() if isinstance(v, list)]
    raise ModelLoadError(f"{p / 'model_index.json'}: no transformer/ or unet/ folder to compile (components: "
                         f"{', '.join(listed) or 'none'})")


def check_weights(folder: Path) -> None:
    """config.json and safetensors weights present; every shard an index names on disk."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a diffusers model folder)")
    if not list(folder.glob("*.safetensors")):
        bins = [f.name for f in folder.glob("*.bin")]
        hint = f" (found {bins[0]}: convert it to safetensors; dcc does not unpickle weights)" if bins else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights{hint}")
    for index in folder.glob("*.safetensors.index.json"):
        for shard in sorted(set((_json(index).get("weight_map") or {}).values())):
            if not (folder / shard).is_file():
                raise ModelLoadError(f"{folder / shard}: missing safetensors shard (named by {index.name})")


class DiffusersConfig(dict):
    """config.json of a diffusers model: its keys, also as attributes; to_dict() as transformers' configs have."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return dict(self)


def read_config(folder: Path) -> DiffusersConfig:
    cfg = _json(folder / "config.json")
    if not isinstance(cfg.get("_class_name"), str):
        raise ModelLoadError(f"{folder / 'config.json'}: no _class_name (the diffusers class of the model)")
    return DiffusersConfig(cfg)


def model_class(folder: Path, config) -> type:
    """The diffusers class config.json names: one of the package's own model classes, nothing else."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin
    name = config["_class_name"]
    try:
        cls = getattr(diffusers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    ok = isinstance(cls, type) and issubclass(cls, ModelMixin) and cls.__module__.startswith("diffusers.")
    if not ok:
        raise ModelLoadError(f"{folder / 'config.json'}: _class_name {name} is not a model class of diffusers "
                             f"{diffusers.__version__} (dcc builds only the classes diffusers ships, never code "
                             f"from the folder)")
    return cls


@contextlib.contextmanager
def parameters_on_meta():
    """Construction with every parameter moved to the meta device as it is registered (no memory, no random
    initialisation), while buffers computed in __init__ (position tables) stay real, unlike torch.device('meta')."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build(folder: Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The skeleton of the folder's model (parameters on meta, in `dtype`), in eval mode."""
    cls = model_class(folder, config)
    try:
        with parameters_on_meta():
            model = cls.from_config(dict(config))
    except Exception as e:
        raise ModelLoadError(f"{folder / 'config.json'}: {cls.__name__} cannot be built from this config "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    return model.eval()


def _has_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention
    return any(isinstance(m, (Attention, AttentionModuleMixin)) for m in module.modules())


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The blocks of a diffusion model: every ModuleList of one class whose modules hold attention, innermost
    (a UNet's Transformer2DModel lists hold the BasicTransformerBlock lists, which are the blocks), in the module
    tree's order. No table of architectures: FLUX's two lists, Z-Image's three, a UNet's nested ones alike."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 and _has_attention(m)]
    inner = [(n, m) for n, m in lists
             if not any(o is not m and o_name.startswith(n + ".") for o_name, o in lists)]
    if not inner:
        raise ModelLoadError(f"{type(model).__name__}: found no blocks (no ModuleList of one module class holding "
                             f"attention)")
    return inner
