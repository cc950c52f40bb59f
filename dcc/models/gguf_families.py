"""Hugging Face configs of the GGUF families beyond llama and gemma3 (gguf_config.py): qwen2, qwen3, phi3 and gemma2,
from the metadata llama.cpp's converter writes (convert_hf_to_gguf.py: Qwen2Model, Qwen3Model, Phi3MiniModel,
Gemma2Model) and the values its loader assumes where the file holds none (src/llama-model.cpp). Mistral (written as
architecture llama, or mistral) converts through gguf_config.llama_config."""
from __future__ import annotations

from pathlib import Path

import torch

from .gguf_config import GGUFError, Meta, _f32, _special_tokens, _with_unk, shape_fields


def _rope(meta: Meta, path: Path, a: str, theta: float) -> dict:
    """Plain or linearly scaled RoPE; other scalings (YaRN, LongRoPE's factor tensors) are refused by name."""
    rope = {"rope_type": "default", "rope_theta": meta.float(f"{a}.rope.freq_base", theta)}
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": meta.float(f"{a}.rope.scaling.factor")}
    elif scaling not in ("none", None, ""):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported for {a} (supported: none, linear)")
    return rope


def _full_rotary(meta: Meta, path: Path, a: str, head_dim: int) -> None:
    rot = meta.int(f"{a}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rot} differs from the head dimension {head_dim}; {a} rotates "
                        f"the whole head")


def _common(meta: Meta, path: Path, a: str, n_vocab_tokens, tied: bool, dtype: torch.dtype, ctx: int,
            eps: float) -> dict:
    return {"vocab_size": meta.int(f"{a}.vocab_size", None) or n_vocab_tokens,
            "max_position_embeddings": meta.int(f"{a}.context_length", ctx),
            "rms_norm_eps": _f32(meta.float(f"{a}.attention.layer_norm_rms_epsilon", eps)),
            **_special_tokens(meta), "tie_word_embeddings": tied, "dtype": str(dtype).removeprefix("torch.")}


def qwen2_config(meta: Meta, path: Path, n_vocab_tokens, tied: bool, dtype: torch.dtype):
    """Qwen2Config: Llama's block with biases on q, k and v (NEOX RoPE: q/k rows as Hugging Face has them)."""
    from transformers import Qwen2Config

    a = "qwen2"
    shape = shape_fields(meta, path, a)
    _full_rotary(meta, path, a, shape["head_dim"])
    cfg = Qwen2Config(**shape, **_common(meta, path, a, n_vocab_tokens, tied, dtype, 32768, 1e-6),
                      rope_parameters=_rope(meta, path, a, 1_000_000.0), hidden_act="silu",
                      use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    return _with_unk(cfg, meta)


def qwen3_config(meta: Meta, path: Path, n_vocab_tokens, tied: bool, dtype: torch.dtype):
    """Qwen3Config: no biases, an RMSNorm over each head of q and k (attn_q_norm, attn_k_norm)."""
    from transformers import Qwen3Config

    a = "qwen3"
    shape = shape_fields(meta, path, a)
    _full_rotary(meta, path, a, shape["head_dim"])
    cfg = Qwen3Config(**shape, **_common(meta, path, a, n_vocab_tokens, tied, dtype, 40960, 1e-6),
                      rope_parameters=_rope(meta, path, a, 1_000_000.0), hidden_act="silu", attention_bias=False,
                      use_sliding_window=False, architectures=["Qwen3ForCausalLM"])
    return _with_unk(cfg, meta)


def phi3_config(meta: Meta, path: Path, n_vocab_tokens, tied: bool, dtype: torch.dtype):
    """Phi3Config: fused attn_qkv and ffn_up (gate and up in one tensor, gate first), RoPE on rope.dimension_count of
    each head's channels (partial_rotary_factor), a sliding window where the file gives one. Phi-3's long-context
    RoPE (rope_factors_long/short tensors) is refused by the caller's tensor check."""
    from transformers import Phi3Config

    a = "phi3"
    shape = shape_fields(meta, path, a)
    rot = meta.int(f"{a}.rope.dimension_count", shape["head_dim"])
    if rot > shape["head_dim"] or rot % 2 or not rot:
        raise GGUFError(f"{path}: rope.dimension_count {rot} must be even and at most the head dimension "
                        f"{shape['head_dim']}")
    if shape["head_dim"] * shape["num_attention_heads"] != shape["hidden_size"]:
        raise GGUFError(f"{path}: key_length {shape['head_dim']} x {shape['num_attention_heads']} heads is not the "
                        f"width {shape['hidden_size']}; Phi-3's heads split the width")
    head_dim = shape.pop("head_dim")   # Phi3Config derives it (width / heads)
    window = meta.int(f"{a}.attention.sliding_window", None)
    common = _common(meta, path, a, n_vocab_tokens, tied, dtype, 4096, 1e-5)
    cfg = Phi3Config(**shape, **common, rope_parameters={**_rope(meta, path, a, 10000.0),
                                                         "partial_rotary_factor": rot / head_dim},
                     hidden_act="silu", sliding_window=window or None,
                     original_max_position_embeddings=common["max_position_embeddings"],
                     architectures=["Phi3ForCausalLM"])
    return _with_unk(cfg, meta)


def gemma2_config(meta: Meta, path: Path, n_vocab_tokens, tied: bool, dtype: torch.dtype):
    """Gemma2Config: norms before and after attention and MLP, tanh soft-caps of the attention scores and the final
    logits, sliding-window attention on every other layer (llama.cpp's set_swa_pattern(2), as transformers)."""
    from transformers import Gemma2Config

    a = "gemma2"
    shape = shape_fields(meta, path, a, head_dim_default=256)
    _full_rotary(meta, path, a, shape["head_dim"])
    # scores are scaled by query_pre_attn_scalar ** -0.5: llama.cpp takes width / heads for the 27B model (46
    # blocks) and the head dimension for the other sizes, as Google's configs do (144 for 27B, else 256)
    scalar = shape["hidden_size"] // shape["num_attention_heads"] if shape["num_hidden_layers"] == 46 \
        else shape["head_dim"]
    cfg = Gemma2Config(**shape, **_common(meta, path, a, n_vocab_tokens, tied, dtype, 8192, 1e-6),
                       rope_parameters=_rope(meta, path, a, 10000.0), hidden_activation="gelu_pytorch_tanh",
                       sliding_window=meta.int(f"{a}.attention.sliding_window", 4096),
                       query_pre_attn_scalar=scalar,
                       attn_logit_softcapping=_f32(meta.float(f"{a}.attn_logit_softcapping", None)),
                       final_logit_softcapping=_f32(meta.float(f"{a}.final_logit_softcapping", None)),
                       attention_bias=False, architectures=["Gemma2ForCausalLM"])
    return _with_unk(cfg, meta)


CONFIGS = {"qwen2": qwen2_config, "qwen3": qwen3_config, "phi3": phi3_config, "gemma2": gemma2_config}
