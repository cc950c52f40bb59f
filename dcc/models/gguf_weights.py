"""GGUF tensors as Hugging Face weights: dequantization to float32, undoing llama.cpp's q/k row permutation, and the
plan of the safetensors shards."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .gguf_config import GGUFError

__all__ = ["unpermute_rope_rows", "permute_rope_rows", "row_major_shape", "dequantize", "plan_shards", "shard_order"]

# llama.cpp stores tensors with their dimensions reversed (ne0 first); gguf.GGUFReader already gives numpy arrays in
# row-major order, so a linear weight comes out as [out, in] like Hugging Face's.
#
# llama.cpp's converter reorders the rows of q_proj and k_proj of every head from Hugging Face's "rotate half" RoPE
# layout to the interleaved one (w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)); `unpermute_rope_rows` inverts it,
# with n_head = head_count for q and head_count_kv for k.


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: GGUF row order (per head: pairs interleaved) -> Hugging Face order
    (per head: first half, then second half)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of an even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (Hugging Face order -> GGUF order); the inverse of `unpermute_rope_rows`."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of an even size")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def row_major_shape(t) -> tuple[int, ...]:
    """The shape of the GGUF tensor `t` in row-major order (its GGUF dims reversed: [out, in] for a linear weight)."""
    return tuple(int(d) for d in reversed(t.shape))


def dequantize(t, path: Path) -> np.ndarray:
    """float32 values of one GGUF tensor, shaped `row_major_shape(t)`. May be a read-only view of the memory map (an F32
    tensor): copy it before handing it to torch.from_numpy."""
    import gguf

    shape = row_major_shape(t)
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(
            f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize"
        ) from None
    except Exception as e:
        raise GGUFError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized ({e})") from None
    a = np.asarray(a, dtype=np.float32)
    if a.size != int(np.prod(shape, dtype=np.int64)):
        raise GGUFError(f"{path}: tensor {t.name} holds {a.size} values, its header says shape {list(shape)}")
    a = a.reshape(shape)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise GGUFError(f"{path}: tensor {t.name} has {bad} NaN/inf values after dequantization (corrupt file?)")
    return a


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split the (name, bytes) list, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_order(hf_name: str):
    """Sort key of a Hugging Face tensor name in the shards: the embedding, then the blocks in order, then the rest."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", hf_name)
    if hf_name == "model.embed_tokens.weight":
        return (0, 0, hf_name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (2, 0, hf_name)
