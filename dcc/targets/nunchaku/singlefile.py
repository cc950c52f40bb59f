"""Nunchaku's single-file checkpoint: one .safetensors whose metadata holds `config` (the diffusers config, JSON),
`model_class`, `quantization_config` (JSON, as nunchaku/merge_safetensors.py writes it) and, when given,
`comfy_config`; written with deterministic bytes to a temporary name and renamed at the end; and its reader.

The bytes are written here rather than by safetensors.torch.save_file, whose header lists the metadata in a
per-process hash order (two runs give different files); the format is safetensors' own: an 8-byte little-endian
header length, the JSON header (padded with spaces to a multiple of 8), then the tensors' bytes back to back."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .expected_keys import GROUP_SIZE, MODELS, PRECISIONS

REQUIRED = ("config", "model_class", "quantization_config")
JSON_KEYS = ("config", "quantization_config", "comfy_config")
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class SingleFileError(ValueError):
    """A checkpoint that cannot be written or read as Nunchaku's single file; the message names the file and key."""


def quantization_config(precision: str, rank: int, skip_refiners: bool | None = None) -> dict:
    """The `quantization_config` Nunchaku writes (merge_safetensors.py @ 92e46957): INT4 = int4 weights and
    activations in groups of 64 with 16-bit scales; NVFP4 = e2m1 in groups of 16 with fp8 e4m3 scales (the weight
    scale_dtype lists the per-tensor and the group scale); `rank` of the low-rank branch; `skip_refiners` for Z-Image
    only. Loaders read `rank` (default 32) and `skip_refiners`; ComfyUI and the C++ FLUX path also `weight.dtype`."""
    if precision not in PRECISIONS:
        raise SingleFileError(f"precision {precision!r} is not one of {PRECISIONS}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise SingleFileError(f"rank {rank!r} must be an integer >= 0")
    fp4 = precision == "nvfp4"
    dtype = "fp4_e2m1_all" if fp4 else "int4"
    cfg = {"method": "svdquant",
           "weight": {"dtype": dtype, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                      "group_size": GROUP_SIZE[precision]},
           "activation": {"dtype": dtype, "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
                          "group_size": GROUP_SIZE[precision]},
           "rank": rank}
    if skip_refiners is not None:
        cfg["skip_refiners"] = bool(skip_refiners)
    return cfg


def _json(value, what: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SingleFileError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SingleFileError(f"{what} must be a JSON object, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def metadata(config, model_class: str, qconfig: dict, comfy_config=None) -> dict[str, str]:
    """The metadata strings of a checkpoint (JSON with sorted keys, so equal inputs give equal bytes)."""
    if model_class not in MODELS:
        raise SingleFileError(f"model_class {model_class!r} is not one of Nunchaku's loaders: {', '.join(MODELS)}")
    md = {"config": _json(config, "config"), "model_class": model_class,
          "quantization_config": _json(qconfig, "quantization_config")}
    if comfy_config is not None:
        md["comfy_config"] = _json(comfy_config, "comfy_config")
    return md


def _header(tensors: dict, md: dict[str, str]) -> tuple[bytes, list[str]]:
    entries, order, offset = {"__metadata__": md}, [], 0
    # widest elements first, then by name: every tensor starts at a multiple of its element size (as safetensors)
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        order.append(name)
        offset += nbytes
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), order


def write(path, tensors: dict, md: dict[str, str]) -> Path:
    """Write `tensors` ({name: CPU tensor}) with metadata `md` (metadata(...)) to `path`, through `.NAME.tmp-PID`
    beside it, renamed over `path` once complete and synced."""
    path = Path(path)
    for key in REQUIRED:
        if key not in md:
            raise SingleFileError(f"{path}: metadata lacks {key!r} (Nunchaku's loaders read it)")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise SingleFileError(f"{path}: {name!r} must map a str to a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise SingleFileError(f"{path}: tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    header, order = _header(cpu, md)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name in order:
                t = cpu[name]
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a single-file checkpoint; metadata's config, quantization_config and comfy_config are
    decoded from JSON. Raises SingleFileError naming the file and the key for a missing file, a file that is not
    safetensors, a missing required metadata key or metadata that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # safetensors raises its own SafetensorError for any malformed file
        raise SingleFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for key in REQUIRED:
        if key not in raw:
            raise SingleFileError(f"{path}: metadata lacks {key!r}, which Nunchaku's loaders read "
                                  f"(present: {sorted(raw) or 'none'})")
    md = dict(raw)
    for key in JSON_KEYS:
        if key in md:
            try:
                md[key] = json.loads(md[key])
            except json.JSONDecodeError as e:
                raise SingleFileError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None
    return tensors, md
