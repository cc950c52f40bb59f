"""RoPE cos/sin tables for every position the cache holds, made once by transformers' own rotary embedding of the
artifact's config (so rope scaling -- linear, llama3, yarn -- is what the reference model applies), in float32."""
from __future__ import annotations

import torch


def rope_tables(config: dict, positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float32 [positions, head_dim], computed on the CPU as the reference model computes them (float32
    position * inv_freq, cos/sin, times the attention scaling), then moved to `device` (same values there)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type", "transformers_version")}
    hf = AutoConfig.for_model(config["model_type"], **cfg)
    rot = LlamaRotaryEmbedding(hf)
    pos = torch.arange(positions)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].to(device).contiguous(), sin[0].to(device).contiguous()
