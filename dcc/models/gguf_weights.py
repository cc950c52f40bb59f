"""GGUF tensors as Hugging Face weights: the tensor names and shapes of each architecture, dequantization to float32,
undoing what llama.cpp's converter did to them (the q/k row permutation of llama, the +1 on Gemma's norm weights), and
the plan of the safetensors shards."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_config import GGUFError

__all__ = [
    "ArchTensors",
    "TENSORS",
    "hf_name",
    "gguf_name",
    "expected_shapes",
    "undo_norm_shift",
    "unpermute_rope_rows",
    "permute_rope_rows",
    "row_major_shape",
    "dequantize",
    "plan_shards",
    "shard_order",
]

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


# ------------------------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class ArchTensors:
    """What an architecture's GGUF tensors are in Hugging Face terms, and what llama.cpp's converter did to them."""

    blocks: dict  # blk.N.<gguf> -> model.layers.N.<hf>.weight
    permute_qk: bool  # q/k rows reordered to llama.cpp's interleaved RoPE (llama); NEOX-RoPE models keep HF's order
    norm_shift: float  # added to every norm weight by the converter (Gemma's RMSNorm computes x * (1 + w))
    extra: tuple = ()  # other GGUF tensors the converter handles itself (named in errors)
    biases: tuple = ()  # the block tensors (GGUF names) that also have a bias (Qwen2's q, k, v)


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTN_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TENSORS = {
    "llama": ArchTensors(
        blocks={**_ATTN_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        permute_qk=True,
        norm_shift=0.0,
        extra=("rope_freqs",),
    ),
    # llama.cpp's gguf-py tensor_mapping for MODEL_ARCH.GEMMA3; its converter (conversion/gemma.py, Gemma3Model)
    # adds 1.0 to every tensor whose HF name ends in "norm.weight" and leaves q/k unpermuted (Gemma uses NEOX RoPE)
    "gemma3": ArchTensors(
        blocks={
            **_ATTN_MLP,
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        permute_qk=False,
        norm_shift=1.0,
    ),
    # a Mistral file under its own architecture name: llama's tensors, q/k rows permuted the same way
    "mistral": ArchTensors(
        blocks={**_ATTN_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        permute_qk=True,
        norm_shift=0.0,
        extra=("rope_freqs",),
    ),
    # llama.cpp's Qwen2Model: Llama's tensors plus q/k/v biases; NEOX RoPE, so q/k rows are not permuted
    "qwen2": ArchTensors(
        blocks={**_ATTN_MLP, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        permute_qk=False,
        norm_shift=0.0,
        biases=("attn_q", "attn_k", "attn_v"),
    ),
    "qwen3": ArchTensors(
        blocks={**_ATTN_MLP, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        permute_qk=False,
        norm_shift=0.0,
    ),
    # llama.cpp's Phi3MiniModel keeps Phi-3's fused tensors: attn_qkv (q, k, v rows) and ffn_up (gate rows, then up)
    "phi3": ArchTensors(
        blocks={"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        permute_qk=False,
        norm_shift=0.0,
    ),
    # llama.cpp's Gemma2Model: Gemma's +1 on every norm weight, norms after attention and MLP as well as before
    "gemma2": ArchTensors(
        blocks={**_ATTN_MLP, "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
        permute_qk=False,
        norm_shift=1.0,
    ),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(name: str, n_layers: int, path: Path, arch: str = "llama") -> str:
    """The Hugging Face name of the GGUF tensor `name`; GGUFError for a tensor a dense `arch` model does not have."""
    blocks = TENSORS[arch].blocks
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in blocks and (m.group(3) == "weight" or m.group(2) in TENSORS[arch].biases):
        i = int(m.group(1))
        if i >= n_layers:
            raise GGUFError(f"{path}: tensor {name} is for block {i}, but block_count is {n_layers}")
        return f"model.layers.{i}.{blocks[m.group(2)]}.{m.group(3)}"
    known = ", ".join(["token_embd", "output_norm", "output", *TENSORS[arch].extra])
    raise GGUFError(
        f"{path}: unknown tensor {name!r} for a {arch} model (known: {known} and "
        f"blk.N.{{{','.join(blocks)}}}.weight)"
    )


def gguf_name(name: str, arch: str = "llama") -> str:
    """The GGUF name of the Hugging Face tensor `name` (for error messages); the inverse of `hf_name`."""
    for g, h in _GLOBAL_NAMES.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    for g, h in TENSORS[arch].blocks.items():
        if m and m.group(2) == h:
            return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return name


def expected_shapes(cfg, arch: str = "llama") -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the model `cfg` needs, with its [out, in] shape (the blocks in `arch`'s order)."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    shape_of = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
        "self_attn.q_norm": (d,),  # one RMSNorm over each head, shared by the heads
        "self_attn.k_norm": (d,),
        "self_attn.qkv_proj": (q + 2 * kv, h),  # Phi-3's fused projections
        "mlp.gate_up_proj": (2 * f, h),
    }
    spec = TENSORS[arch]
    per = {f"{m}.weight": shape_of.get(m, (h,)) for m in spec.blocks.values()}  # the rest: norms of the residual
    per.update({f"{spec.blocks[g]}.bias": shape_of[spec.blocks[g]][:1] for g in spec.biases})
    for i in range(cfg.num_hidden_layers):
        for k, s in per.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes


# ------------------------------------------------------------------------------------------------------------ values


def undo_norm_shift(a: np.ndarray, shift: float) -> np.ndarray:
    """The Hugging Face norm weight from the GGUF one that llama.cpp's converter stored as w + shift (float32: for
    Gemma-3-270M, w_gguf - 1 is exactly a bfloat16 value for every element, i.e. the converter added 1 in float32 to
    the bfloat16 weights, so this gives them back bit for bit)."""
    return a - np.float32(shift) if shift else a


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
