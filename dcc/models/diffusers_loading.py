"""LazyModel's diffusers side: fill a LazyModel from a diffusers transformer, UNet or pipeline folder -- the same
TensorIndex, checks and per-block materialisation as a transformers model, with diffusers' class as the skeleton
and every block list of the model as its blocks."""
from __future__ import annotations

from pathlib import Path

from . import checks
from .diffusers_folder import build, check_weights, find_block_lists, read_config, resolve
from .loader import ModelLoadError, TensorIndex


def load_diffusers(lm, path: Path) -> None:
    """Set lm's path, config, adapter, index, skeleton and blocks from a diffusers folder (nothing read but JSON and
    safetensors headers)."""
    from .diffusers import DiffusersModel
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    checks.check_not_artifact(path)
    folder, pipeline = resolve(path)
    checks.check_not_artifact(folder)
    checks.check_no_remote_code(folder)
    check_weights(folder)
    lm.path, lm.pipeline_path = folder, pipeline
    lm.config = read_config(folder)
    checks.check_quantization_config(folder, lm.config)
    lm.adapter = DiffusersModel()
    lm.index = TensorIndex(folder)
    lm.model = build(folder, lm.config, lm.dtype)
    lm.key_prefix = ""
    lists = find_block_lists(lm.model)
    lm.block_lists = [name for name, _ in lists]
    lm.blocks_prefix = ", ".join(lm.block_lists)
    lm.blocks = [b for _, mods in lists for b in mods]
    lm.block_prefixes = [f"{name}.{i}" for name, mods in lists for i in range(len(mods))]
    lm.tied = {}
    checks.check_tensors(folder, lm.model, lm.index, lm.tied, library="diffusers")
    lm.index.close()
