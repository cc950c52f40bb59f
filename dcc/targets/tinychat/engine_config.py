"""What TinyChat reads of an artifact's config.json, written down from its source as a spec: mit-han-lab/llm-awq @
d6e797a, tinychat/ (pyproject.toml pins transformers==4.46.0, whose AutoConfig builds the config object in
tinychat/demo.py). `READS` says where each field is read, `load` reads a config dict the way TinyChat does,
`rope_problem` says why TinyChat cannot apply a RoPE. The model class and the quantization come from TinyChat's
command line, not from config.json: --model_type (llama for Llama and Mistral, qwen for Qwen2), --q_group_size,
--precision W4A16, --dtype."""
from __future__ import annotations

from ..common.hf4_config import EngineConfigError, HF4Config, hf4_rope_scaling_error, plain_rope_problem

SOURCE = "mit-han-lab/llm-awq@d6e797a42b9ef7778de8ee2352116e0f48a78d61"
TRANSFORMERS = "4.46.0"
MODEL_FLAG = {"llama": "llama", "mistral": "llama", "qwen2": "qwen"}   # config model_type -> --model_type
L, Q, A = "tinychat/models/llama.py", "tinychat/models/qwen2.py", "tinychat/modules/fused_attn.py"

READS = {
    "model_type": "tinychat/demo.py: AutoConfig.from_pretrained picks the transformers config class",
    "hidden_size": f"{L}, {Q}: also head_dim = hidden_size // num_attention_heads (config.head_dim is not read)",
    "num_attention_heads": f"{L}, {Q}", "num_key_value_heads": f"{L}, {Q}", "num_hidden_layers": f"{L}, {Q}",
    "intermediate_size": f"{L}, {Q}", "rms_norm_eps": f"{L}, {Q}", "vocab_size": f"{L}, {Q}",
    "max_position_embeddings": f"{L}, {Q}: the RoPE table (2 x positions) and the KV cache length",
    "rope_theta": f"{L}, {Q}, {A}: config.rope_theta (attribute access), the base of the RoPE table and kernel",
    "rope_scaling": f"{L}, {Q}, {A}: config.rope_scaling (attribute access: a config without the field fails); "
                    f"None -> 1.0, else its 'factor'",
    "hidden_act": Q, "attention_dropout": Q, "pad_token_id": f"{Q} (embedding padding index)",
}

# what transformers 4.46.0's config classes set where config.json lacks a field TinyChat reads (their __init__
# defaults); 4.46.0's MistralConfig has no rope_scaling field at all
DEFAULTS = {
    "llama": {"torch_dtype": None, "rope_theta": 10000.0, "rope_scaling": None},
    "mistral": {"torch_dtype": None, "rope_theta": 10000.0},
    "qwen2": {"torch_dtype": None, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
              "attention_dropout": 0.0},
}

# TinyChat's RoPE: the prefill table (Transformer.precompute_freqs in tinychat/models/llama.py and qwen2.py) takes
# rope_theta and ignores its `scale` argument; the decode kernel (awq/kernels/csrc/attention, single_query_attention
# called from tinychat/modules/fused_attn.py) multiplies positions by rope_scaling['factor']. Only plain RoPE gives
# the same positions in both, and no transformers variant scales positions up.
ROPE_WHERE = f"{L} precompute_freqs and {A} @ d6e797a"


def load(cfg: dict) -> dict:
    """The values TinyChat builds its model with, read from a config.json dict as TinyChat reads them under
    transformers 4.46.0; raises EngineConfigError where TinyChat would not load it."""
    mt = cfg.get("model_type")
    if mt not in MODEL_FLAG:
        raise EngineConfigError(f"model_type {mt!r}: TinyChat's W4A16 path builds Llama, Mistral and Qwen2 models "
                                f"(--model_type llama or qwen) only")
    if mt != "mistral":   # 4.46.0's LlamaConfig and Qwen2Config validate rope_scaling
        err = hf4_rope_scaling_error(cfg.get("rope_scaling"), TRANSFORMERS)
        if err:
            raise EngineConfigError(f"transformers {TRANSFORMERS} refuses the config: {err}")
    c = HF4Config(cfg, DEFAULTS[mt])
    try:
        rope_theta, rope_scaling = c.rope_theta, c.rope_scaling
    except AttributeError as e:
        raise EngineConfigError(f"TinyChat reads config.rope_theta and config.rope_scaling, and a {mt} config of "
                                f"transformers {TRANSFORMERS} without them in config.json has none ({e})") from None
    out = {
        "model_type_flag": MODEL_FLAG[mt], "model_type": mt, "dtype": c.torch_dtype,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.hidden_size // c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size, "rope_theta": rope_theta, "rope_scaling": rope_scaling,
        # fused_attn.py: the decode kernel's position multiplier
        "decode_rotary_scale": 1.0 if rope_scaling is None else rope_scaling.get("factor", 1.0),
    }
    if MODEL_FLAG[mt] == "qwen":
        out.update(hidden_act=c.hidden_act, attention_dropout=c.attention_dropout)
    return out


def rope_problem(cfg: dict) -> str | None:
    """Why TinyChat cannot apply the RoPE of a (transformers 5) config dict, in one line; None where it can."""
    return plain_rope_problem(cfg, "TinyChat", f"its prefill RoPE table ignores rope_scaling and its decode kernel "
                                               f"multiplies positions by the factor: {ROPE_WHERE}")
