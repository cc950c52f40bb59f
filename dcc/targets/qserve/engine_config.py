"""What QServe reads of an artifact's config.json, written down from its source as a spec: mit-han-lab/qserve @
de6a2ec (pyproject.toml pins transformers==4.37.2, whose AutoConfig builds the config object). `READS` says where each
field is read, `load` reads a config dict the way QServe does, `rope_problem` says why QServe cannot apply a RoPE.
QServe takes no quantization field from config.json: precision and group size are its --precision and --group-size."""
from __future__ import annotations

from ..common.hf4_config import EngineConfigError, HF4Config, hf4_rope_scaling_error, plain_rope_problem

SOURCE = "mit-han-lab/qserve@de6a2ec6b5248ce71f3d738c6c41c45195b2fb4e"
TRANSFORMERS = "4.37.2"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")   # both build QServe's Llama (model_runner.py)
M = "qserve/modeling/models/llama_w4a8_unpad.py"

READS = {
    "architectures": "qserve/worker/model_runner.py: hf_config.architectures[0] picks the model class",
    "torch_dtype": "qserve/config.py ModelConfig: self.dtype = hf_config.torch_dtype",
    "max_position_embeddings": f"qserve/config.py: max_model_len; {M} LlamaAttention: the RoPE kernels' max "
                               f"positions and the KV cache length",
    "sliding_window": "qserve/config.py get_sliding_window: getattr(hf_config, 'sliding_window', None), the block "
                      "manager's window (qserve/core/block_manager.py)",
    "head_dim": "qserve/config.py get_head_size: hf_config.head_dim where present (KV cache sizes); the model itself "
                f"uses hidden_size // num_attention_heads ({M})",
    "hidden_size": M, "num_attention_heads": M, "num_key_value_heads": M, "num_hidden_layers": M,
    "intermediate_size": M, "rms_norm_eps": M, "vocab_size": M, "pad_token_id": f"{M} LlamaModel (stored only)",
    "attention_bias": f"{M} LlamaAttention: args.attention_bias if hasattr(args, 'attention_bias') else False",
    "rope_theta": f"{M} LlamaAttention: getattr(args, 'rope_theta', 10000), the base of both RoPE kernels",
    "rope_scaling": f"{M} LlamaAttention: getattr(args, 'rope_scaling', None), read and never used",
}

# what transformers 4.37.2's config classes set where config.json lacks a field QServe reads (their __init__ defaults)
DEFAULTS = {
    "llama": {"torch_dtype": None, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False},
    "mistral": {"torch_dtype": None, "rope_theta": 10000.0, "sliding_window": 4096},
}

# QServe's RoPE: the prefill kernel (apply_bias_rope_update_kv_cache) fixes RotaryScalingType kLINEAR with scale 1.0
# (kernels/csrc/fused_attention/update_kv_cache.cu), the decode kernel (single_query_attention,
# kernels/csrc/fused_attention/fused_attention.cpp) takes only rotary_base; both rotate the whole head, NeoX style
ROPE_WHERE = f"kernels/csrc/fused_attention/update_kv_cache.cu and {M} @ de6a2ec"


def load(cfg: dict) -> dict:
    """The values QServe builds its model with, read from a config.json dict as QServe reads them under
    transformers 4.37.2; raises EngineConfigError where QServe would not load it."""
    mt = cfg.get("model_type")
    if mt == "llama":   # 4.37.2's LlamaConfig validates rope_scaling; its MistralConfig has no such field
        err = hf4_rope_scaling_error(cfg.get("rope_scaling"), TRANSFORMERS)
        if err:
            raise EngineConfigError(f"transformers {TRANSFORMERS} refuses the config: {err}")
    arch = (cfg.get("architectures") or [None])[0]
    if mt not in DEFAULTS or arch not in ARCHITECTURES:
        raise EngineConfigError(f"architectures[0] {arch!r} (model_type {mt!r}): QServe's model runner builds "
                                f"{' and '.join(ARCHITECTURES)} only")
    c = HF4Config(cfg, DEFAULTS[mt])
    return {
        "architecture": arch, "model_type": c.model_type, "dtype": c.torch_dtype,
        "max_model_len": c.max_position_embeddings, "sliding_window": getattr(c, "sliding_window", None),
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.hidden_size // c.num_attention_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "attention_bias": c.attention_bias if hasattr(c, "attention_bias") else False,
        "rope_theta": getattr(c, "rope_theta", 10000), "rope_scaling": getattr(c, "rope_scaling", None),
    }


def rope_problem(cfg: dict) -> str | None:
    """Why QServe cannot apply the RoPE of a (transformers 5) config dict, in one line; None where it can."""
    return plain_rope_problem(cfg, "QServe", f"its RoPE kernels take rope_theta and run at scale 1: {ROPE_WHERE}")
