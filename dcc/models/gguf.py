"""Convert a GGUF file of llama, mistral (llama.cpp writes Mistral as llama; transformers reads either), gemma3
(text-only Gemma 3), qwen2, qwen3, phi3 or gemma2 into a Hugging Face model folder (config.json,
generation_config.json, safetensors weights, tokenizer files) that the rest of dcc loads like any other:
`gguf_to_hf(path, out_dir)`, or `cached_gguf_to_hf(path)` to convert once into $DCC_CACHE (or ~/.cache/dcc)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .gguf_config import GGUFError, Meta, gemma3_config, llama_config, open_reader
from .gguf_families import CONFIGS as FAMILY_CONFIGS
from .gguf_tokenizer import write_tokenizer
from .gguf_weights import (
    TENSORS,
    dequantize,
    expected_shapes,
    gguf_name,
    hf_name,
    permute_rope_rows,
    plan_shards,
    row_major_shape,
    shard_order,
    undo_norm_shift,
    unpermute_rope_rows,
)

__all__ = [
    "GGUFError",
    "gguf_to_hf",
    "cached_gguf_to_hf",
    "SUPPORTED_ARCHITECTURES",
    "unpermute_rope_rows",
    "permute_rope_rows",
]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "gemma3", *FAMILY_CONFIGS)

# Part of the cache key: bump when a conversion written by an older dcc must not be reused.
CONVERTER_VERSION = 2   # 2: qwen2, qwen3, phi3, gemma2

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

_MARKER = "dcc_gguf_source.json"


# ---------------------------------------------------------------------------------------------------------- convert


def _convert_into(path: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int, progress: bool) -> None:
    """Write the Hugging Face folder of the GGUF file at `path` into the (empty) folder `out`."""
    from transformers import GenerationConfig

    reader = open_reader(path)
    meta = Meta(reader, path)
    arch = meta.get("general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    # name every tensor first, so a file dcc cannot convert fails before any work is done
    by_gguf = {}
    for t in reader.tensors:
        if t.name in by_gguf:
            raise GGUFError(f"{path}: tensor {t.name} appears twice")
        by_gguf[t.name] = t
    n_tokens = len(meta.get("tokenizer.ggml.tokens", None) or []) or None
    if n_tokens is None and "token_embd.weight" in by_gguf:
        n_tokens = int(by_gguf["token_embd.weight"].shape[-1])
    tied = "output.weight" not in by_gguf
    if arch in ("llama", "mistral"):
        rope_freqs = None
        if "rope_freqs.weight" in by_gguf:
            rope_freqs = dequantize(by_gguf.pop("rope_freqs.weight"), path)
        cfg = llama_config(meta, path, n_tokens, tied, dtype, rope_freqs, arch)
    elif arch == "phi3" and {"rope_factors_long.weight", "rope_factors_short.weight"} & set(by_gguf):
        raise GGUFError(f"{path}: phi3 with LongRoPE factors (rope_factors_long/short, the 128k-context models) is "
                        f"not supported; the 4k-context models are")
    elif arch == "gemma3":
        cfg = gemma3_config(meta, path, n_tokens, tied, dtype)
    else:
        cfg = FAMILY_CONFIGS[arch](meta, path, n_tokens, tied, dtype)
    n_layers = cfg.num_hidden_layers
    hf_of = {g: hf_name(g, n_layers, path, arch) for g in by_gguf}
    expected = expected_shapes(cfg, arch)
    have = set(hf_of.values())
    missing = [k for k in expected if k not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GGUFError(f"{path}: tensor {gguf_name(missing[0], arch)} (for {missing[0]}) is missing{more}")
    for g, h in hf_of.items():
        shape = row_major_shape(by_gguf[g])
        if shape != expected[h]:
            raise GGUFError(f"{path}: tensor {g} has shape {list(shape)}, expected {list(expected[h])} for this config")

    _write_weights(path, out, by_gguf, hf_of, cfg, arch, dtype, max_shard_bytes, progress)

    cfg.save_pretrained(str(out))
    try:
        GenerationConfig.from_model_config(cfg).save_pretrained(str(out))
    except Exception:  # a generation config is a convenience; the model folder is complete without it
        pass
    write_tokenizer(meta, path, out, cfg.max_position_embeddings)
    st = path.stat()
    marker = {
        "source": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "architecture": arch,
        "file_type": meta.int("general.file_type", None),
        "dtype": str(dtype).removeprefix("torch."),
        "converter_version": CONVERTER_VERSION,
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")



def _write_weights(
    path: Path,
    out: Path,
    by_gguf: dict,
    hf_of: dict[str, str],
    cfg,
    arch: str,
    dtype: torch.dtype,
    max_shard_bytes: int,
    progress: bool,
) -> None:
    """Dequantize the GGUF tensors `by_gguf` (named `hf_of`) into safetensors shards in `out`, undoing what llama.cpp's
    converter did for `arch` (q/k rows un-permuted for llama, 1 taken off every norm weight for gemma3)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    spec = TENSORS[arch]
    expected = expected_shapes(cfg, arch)
    order = sorted(hf_of.items(), key=lambda gh: shard_order(gh[1]))
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(g, int(np.prod(expected[h], dtype=np.int64)) * itemsize) for g, h in order]
    shards = plan_shards(sizes, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bar = tqdm(
        total=len(order), desc=f"converting {path.name}", unit="tensor", leave=False, disable=not progress or None
    )
    weight_map: dict[str, str] = {}
    try:
        for fname, names in zip(files, shards):
            tensors: dict[str, torch.Tensor] = {}
            for g in names:
                h = hf_of[g]
                a = dequantize(by_gguf[g], path)
                if spec.permute_qk and h.endswith("self_attn.q_proj.weight"):
                    a = unpermute_rope_rows(a, cfg.num_attention_heads)
                elif spec.permute_qk and h.endswith("self_attn.k_proj.weight"):
                    a = unpermute_rope_rows(a, cfg.num_key_value_heads)
                elif h.endswith("norm.weight"):  # every RMSNorm: model.norm, *_layernorm, self_attn.{q,k}_norm
                    a = undo_norm_shift(a, spec.norm_shift)
                if not (a.flags.writeable and a.flags.c_contiguous):  # e.g. a read-only view of the memory map
                    a = np.array(a, order="C", copy=True)  # torch.from_numpy warns on (and shares) read-only memory
                tensors[h] = torch.from_numpy(a).to(dtype)
                weight_map[h] = fname
                bar.update(1)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
    finally:
        bar.close()
    if len(files) > 1:
        total = sum(n for _, n in sizes)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def gguf_to_hf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert the llama or gemma3 GGUF file at `path` into a Hugging Face folder `out_dir` and return it.

    The folder is built in a temporary folder beside `out_dir` and renamed into place at the end, so `out_dir` is either
    absent or complete. An existing non-empty `out_dir` is an error unless `overwrite`. Weights are stored in `dtype`
    (float32 keeps the dequantized values exactly); more than `max_shard_bytes` of them are split into shards with a
    model.safetensors.index.json. Raises GGUFError for a missing, truncated or corrupt file, an unsupported
    architecture or tokenizer, and unknown or misshapen tensors."""
    path = Path(path).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GGUFError(f"{path}: dtype must be a floating torch dtype, got {dtype!r}")
    if out.exists() and not out.is_dir():
        raise GGUFError(f"{path}: output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GGUFError(f"{path}: output folder {out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert_into(path, tmp, dtype, max_shard_bytes, progress)
        _move_into_place(tmp, out, replace=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    old = None
    if out.exists() and (replace or not any(out.iterdir())):
        old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------- cache


def _default_cache_dir() -> Path:
    env = os.environ.get("DCC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dcc"


def _is_complete(folder: Path) -> bool:
    return (
        (folder / _MARKER).is_file()
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def cached_gguf_to_hf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder converted from the GGUF file at `path`, converting it (float32) the first time.

    The folder lives in `cache_dir` (default $DCC_CACHE, else ~/.cache/dcc) under gguf/<stem>-<key>, where the key is a
    sha256 of the file's resolved path, size and mtime_ns (and the converter version): a changed file is converted
    again, an unchanged one never."""
    src = Path(path).expanduser()
    try:
        src = src.resolve(strict=True)
        st = src.stat()
    except OSError as e:
        raise GGUFError(f"{src}: cannot read the file ({e.strerror or e})") from None
    if not src.is_file():
        raise GGUFError(f"{src}: not a file")
    key = hashlib.sha256(
        json.dumps([str(src), st.st_size, st.st_mtime_ns, CONVERTER_VERSION]).encode()
    ).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    folder = (root / "gguf" / f"{src.stem}-{key}").absolute()
    if _is_complete(folder):
        return folder
    logging.getLogger("dcc").info(f"converting {src} to a Hugging Face folder at {folder} (once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        # a leftover incomplete folder (no marker: cannot come from a finished conversion) is replaced
        return gguf_to_hf(src, folder, overwrite=folder.exists())
    except OSError:
        if _is_complete(folder):  # another process finished the same conversion first
            return folder
        raise
