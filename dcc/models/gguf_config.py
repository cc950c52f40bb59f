"""GGUF metadata reading, and the Hugging Face config it gives: LlamaConfig for llama (MistralConfig for mistral),
Gemma3TextConfig for gemma3 (the values llama.cpp's converter writes, and the ones llama.cpp's loader assumes because
the file does not hold them). qwen2, qwen3, phi3 and gemma2: gguf_families.py."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGUFError", "Meta", "open_reader", "llama_config", "gemma3_config"]


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file (and tensor) and what is wrong."""


# --------------------------------------------------------------------------------------------------------- metadata


_MISSING = object()


def open_reader(path: Path):
    """A gguf.GGUFReader over the file at `path` (read-only memory map); GGUFError if it is not a readable GGUF file."""
    import gguf

    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad magic, truncation, corruption
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFError(f"{path}: not a readable GGUF file (missing, truncated or corrupt: {first})") from None


def _field_value(field):
    """The Python value of a GGUFReader field (scalar, string, or list of them); works on old and new gguf."""
    import gguf

    vt = gguf.GGUFValueType
    types = list(field.types)

    def scalar(t, part):
        if t == vt.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part.tolist()
        v = v[0] if isinstance(v, list) else v
        return bool(v) if t == vt.BOOL else v

    if not types:
        return None
    if types[0] == vt.ARRAY:
        sub = types[-1]
        if sub == vt.ARRAY:  # nested arrays: not used by anything read here
            return None
        return [scalar(sub, field.parts[i]) for i in field.data]
    return scalar(types[0], field.parts[field.data[0]])


class Meta:
    """The metadata of a GGUF file: typed, cached look-ups whose errors name the file and the key."""

    def __init__(self, reader, path: Path):
        self.reader = reader
        self.path = path
        self._cache: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=_MISSING):
        if key in self._cache:
            return self._cache[key]
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            value = _field_value(field)
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read ({e})") from None
        self._cache[key] = value
        return value

    def int(self, key: str, default=_MISSING) -> int | None:
        v = self.get(key, default)
        if v is None or v is default:
            return v
        if isinstance(v, list):
            if v and all(x == v[0] for x in v):  # a per-layer array with one value for every layer
                v = v[0]
            else:
                raise GGUFError(
                    f"{self.path}: metadata key {key!r} varies per layer ({v[:8]}...), which is not supported"
                )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise GGUFError(f"{self.path}: metadata key {key!r} should be an integer, got {v!r}")
        return int(v)

    def float(self, key: str, default=_MISSING) -> float | None:
        v = self.get(key, default)
        if v is None or v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be a number, got {v!r}")
        return float(v)


# ------------------------------------------------------------------------------------------------------------ config


def _rope_from_freqs(freqs: np.ndarray, theta: float, rot_dim: int) -> dict | None:
    """Llama-3.1-style RoPE scaling from llama.cpp's rope_freqs.weight (the per-frequency divisors its converter
    computes). The tensor holds only the result, so the known parameter sets are tried and one must reproduce it."""
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    if np.allclose(freqs, 1.0):
        return None
    factor = float(freqs.max())
    inv = 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
    if inv.shape != freqs.shape:
        return False
    for low, high, old_ctx in ((1.0, 4.0, 8192),):
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = 1.0 / ((1 - smooth) / factor + smooth)
        expect = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
        if np.allclose(expect, freqs, rtol=1e-3, atol=1e-4):
            return {
                "rope_type": "llama3",
                "rope_theta": theta,
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_ctx,
            }
    return False


def llama_config(meta: Meta, path: Path, n_vocab_tokens: int | None, tied: bool, dtype: torch.dtype, rope_freqs,
                 arch: str = "llama"):
    """LlamaConfig; MistralConfig for a file whose architecture is mistral (the same tensors and metadata under the
    mistral prefix, and a sliding window where the file gives one)."""
    from transformers import LlamaConfig, MistralConfig

    a = arch
    if (meta.int(f"{a}.expert_count", 0) or 0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts llama GGUF files are not supported (only dense llama)")
    shape = shape_fields(meta, path, a)
    head_dim = shape["head_dim"]
    rot_dim = meta.int(f"{a}.rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rot_dim} differs from key_length {head_dim} (a llama model "
                        f"rotates the whole head); not supported")
    theta = meta.float(f"{a}.rope.freq_base", 10000.0)
    eps = meta.float(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    ctx = meta.int(f"{a}.context_length", 2048)
    vocab = meta.int(f"{a}.vocab_size", None) or n_vocab_tokens

    rope: dict = {"rope_type": "default", "rope_theta": theta}
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": meta.float(f"{a}.rope.scaling.factor")}
    elif scaling not in ("none", None, ""):
        raise GGUFError(
            f"{path}: RoPE scaling {scaling!r} is not supported (supported: none, linear, llama3 rope_freqs)"
        )
    if rope_freqs is not None:
        r = _rope_from_freqs(rope_freqs, theta, rot_dim)
        if r is False:
            raise GGUFError(
                f"{path}: tensor rope_freqs.weight holds a RoPE scaling that does not match llama3's "
                "(factor, low 1, high 4, original context 8192); not supported"
            )
        if r is not None:
            rope = r

    common = dict(
        vocab_size=vocab,
        **shape,
        hidden_act="silu",
        max_position_embeddings=ctx,
        rms_norm_eps=eps,
        rope_parameters=rope,
        **_special_tokens(meta),
        tie_word_embeddings=tied,
        dtype=str(dtype).removeprefix("torch."),
    )
    if a == "mistral":
        cfg = MistralConfig(**common, sliding_window=meta.int(f"{a}.attention.sliding_window", None),
                            architectures=["MistralForCausalLM"])
    else:
        cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"])
    return _with_unk(cfg, meta)


def shape_fields(meta: Meta, path: Path, a: str, head_dim_default=None) -> dict:
    """The sizes every family shares: width, blocks, MLP width, heads, KV heads and the head dimension (key_length,
    else width / heads); the value and rotary dimensions must equal it (a partial rotary factor is read by the caller
    where the family has one)."""
    hidden = meta.int(f"{a}.embedding_length")
    n_layers = meta.int(f"{a}.block_count")
    n_head = meta.int(f"{a}.attention.head_count")
    n_kv = meta.int(f"{a}.attention.head_count_kv", n_head)
    if not n_head or not n_kv or not hidden or not n_layers:
        raise GGUFError(f"{path}: metadata gives {n_head} heads, {n_kv} kv heads, width {hidden}, {n_layers} blocks")
    if n_head % n_kv:
        raise GGUFError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    head_dim = meta.int(f"{a}.attention.key_length", head_dim_default)
    if head_dim is None:
        if hidden % n_head:
            raise GGUFError(f"{path}: embedding_length {hidden} is not a multiple of head_count {n_head}")
        head_dim = hidden // n_head
    v_dim = meta.int(f"{a}.attention.value_length", head_dim)
    if v_dim != head_dim or head_dim % 2:
        raise GGUFError(f"{path}: key_length {head_dim} and value_length {v_dim} must be one even number for {a}")
    return {"hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_head,
            "num_key_value_heads": n_kv, "head_dim": head_dim,
            "intermediate_size": meta.int(f"{a}.feed_forward_length")}


def _special_tokens(meta) -> dict:
    """bos / eos / pad token ids from the tokenizer metadata (None where the file has none)."""
    tok = lambda key: meta.int(f"tokenizer.ggml.{key}", None)   # noqa: E731
    return {"bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
            "pad_token_id": tok("padding_token_id")}


def _with_unk(cfg, meta):
    """The config with unk_token_id where the file names one (configs have no such argument)."""
    unk = meta.int("tokenizer.ggml.unknown_token_id", None)
    if unk is not None:
        cfg.unk_token_id = unk
    return cfg


def _f32(v: float | None) -> float | None:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999997e-07 -> 1e-06), as in the
    Hugging Face config the GGUF file was made from; the model computes in float32 either way."""
    return None if v is None else float(str(np.float32(v)))


def _gemma3_layer_types(meta: Meta, path: Path, n_layers: int) -> list[str]:
    """Sliding or full attention per layer. llama.cpp's loader hard-codes Gemma 3's pattern (set_swa_pattern(6):
    five sliding layers, then one full), as transformers' Gemma3TextConfig does (sliding_window_pattern 6); a file that
    states its own pattern (attention.sliding_window_pattern: a period, or one flag per layer, true = sliding) wins."""
    key = "gemma3.attention.sliding_window_pattern"
    v = meta.get(key, None)
    if isinstance(v, list):
        if len(v) != n_layers:
            raise GGUFError(f"{path}: metadata key {key!r} has {len(v)} entries for {n_layers} blocks")
        sliding = [bool(x) for x in v]
    else:
        period = 6 if v is None else meta.int(key)
        if period < 1:
            raise GGUFError(f"{path}: metadata key {key!r} is {period}, expected a period >= 1")
        sliding = [bool((i + 1) % period) for i in range(n_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def gemma3_config(meta: Meta, path: Path, n_vocab_tokens: int | None, tied: bool, dtype: torch.dtype):
    """Gemma3TextConfig (text-only Gemma 3) from the metadata that llama.cpp's converter writes (conversion/gemma.py,
    Gemma3Model.set_gguf_parameters) and the values its loader assumes (src/llama-model.cpp, LLM_ARCH_GEMMA3)."""
    from transformers import Gemma3TextConfig

    a = "gemma3"
    shape = shape_fields(meta, path, a, head_dim_default=256)   # key_length: the converter's default, as it writes it
    hidden, n_layers, n_head, head_dim = (shape[k] for k in ("hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "head_dim"))
    rot_dim = meta.int(f"{a}.rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rot_dim} must equal key_length {head_dim} for gemma3 (it "
                        f"rotates the whole head)")
    if meta.get(f"{a}.attn_logit_softcapping", None) is not None:
        raise GGUFError(f"{path}: gemma3 with attn_logit_softcapping is not supported (Gemma 3 has none)")

    # RoPE: global layers use rope.freq_base (and any linear scaling, e.g. factor 8 on Gemma 3 4B-27B), sliding layers
    # the local base, which llama.cpp fixes at 10000 unscaled (rope_freq_base_train_swa) unless the file gives one
    full: dict = {"rope_type": "default", "rope_theta": meta.float(f"{a}.rope.freq_base", 1_000_000.0)}
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        full = {**full, "rope_type": "linear", "factor": meta.float(f"{a}.rope.scaling.factor")}
    elif scaling not in ("none", None, ""):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported for gemma3 (supported: none, linear)")
    local = {"rope_type": "default", "rope_theta": meta.float(f"{a}.rope.freq_base_swa", 10_000.0)}

    # attention scores are scaled by query_pre_attn_scalar ** -0.5: llama.cpp uses hidden/heads for the 27B model
    # (62 blocks) and head_dim for every other size, as Google's configs do (168 for 27B, else 256)
    scalar = hidden // n_head if n_layers == 62 else head_dim

    cfg = Gemma3TextConfig(
        vocab_size=meta.int(f"{a}.vocab_size", None) or n_vocab_tokens,
        **shape,
        hidden_activation="gelu_pytorch_tanh",  # llama.cpp's gemma3 FFN: GELU (tanh approximation) gate * up
        max_position_embeddings=meta.int(f"{a}.context_length", 131_072),
        rms_norm_eps=_f32(meta.float(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters={"full_attention": full, "sliding_attention": local},
        sliding_window=meta.int(f"{a}.attention.sliding_window"),  # llama.cpp requires it too
        layer_types=_gemma3_layer_types(meta, path, n_layers),
        query_pre_attn_scalar=scalar,
        final_logit_softcapping=_f32(meta.float(f"{a}.final_logit_softcapping", None)),
        attn_logit_softcapping=None,
        **_special_tokens(meta),
        tie_word_embeddings=tied,
        attention_bias=False,
        architectures=["Gemma3ForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )
    return _with_unk(cfg, meta)
