"""What the fast decoder needs to know about a Llama-family artifact (shapes, norm epsilon, KV cache bits, whether
QServe's fused engine kernels apply), and why an artifact it cannot run is refused (one line, for the fallback)."""
from __future__ import annotations

from dataclasses import dataclass

from .kinds import FastKind, kind_of

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# RoPE types whose cos/sin depend on the position only (dynamic / longrope change with the sequence length)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LlamaSpec:
    """The decoder's shape and run-time numerics, read from the artifact's config and manifest."""
    target: str                  # the artifact's target
    kind: FastKind               # its part of the fast decoder (Target.fast_decoder)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    tied: bool
    kv_bits: int | None          # 4: QServe's KV4 cache; None: 16-bit
    engine: bool                 # the engine's fused norm + quantization and SiLU apply (kind.norm_quant, silu_mul)
    max_positions: int | None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _rope_type(cfg: dict) -> str:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def unsupported(art) -> str | None:
    """Why the fast decoder cannot run `art` (None: it can)."""
    m, cfg = art.manifest, art.config
    target, kind = m.get("target"), kind_of(art)
    if kind is None:
        return f"target {target!r} (the fast decoder runs the targets whose Target.fast_decoder gives it a part)"
    if (m.get("source") or {}).get("architecture") != "LlamaForCausalLM" or cfg.get("model_type") != "llama":
        return f"architecture {(m.get('source') or {}).get('architecture')!r} (the fast decoder is Llama only)"
    if cfg.get("hidden_act") not in ("silu", "swish"):
        return f"hidden_act {cfg.get('hidden_act')!r} (SwiGLU with SiLU only)"
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        return "linear biases (the fast decoder has none)"
    if _rope_type(cfg) not in STATIC_ROPE:
        return f"rope type {_rope_type(cfg)!r} (its cos/sin change with the sequence length)"
    if any("stored" in v for v in m["layers"].values()):
        return "layers stored in an engine's own file"
    rt = m.get("runtime") or {}
    if set(rt) - {"activations", "kv_bits", "kv_cache"}:
        return f"run-time numerics {sorted(set(rt) - {'activations', 'kv_bits', 'kv_cache'})}"
    bits = set((rt.get("kv_cache") or {}).values())
    if bits - {4} or (bits and len(rt["kv_cache"]) != cfg.get("num_hidden_layers")):
        return f"KV cache bits {sorted(bits)} (the fast decoder has 16-bit and QServe's 4-bit cache, every layer)"
    for name, e in m["layers"].items():
        if "skip_reason" not in e and e.get("format") not in kind.formats:
            return f"layer {name} has format {e.get('format')!r}"
    heads = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if heads % kvh or hd % 2:
        return f"{heads} heads over {kvh} KV heads, head_dim {hd}"
    return None


def fast_path_problem(art, exact: bool = False) -> str | None:
    """Why `dcc generate --device cuda` does not take the fast decoder (None: it does): --exact asks for the
    reference's whole-sequence computation, DCC_FAST_DECODE=0 turns it off, or the artifact is not one it runs."""
    import os
    if exact:
        return "--exact runs the reference model on the whole sequence at every step"
    if os.environ.get("DCC_FAST_DECODE", "1") == "0":
        return "DCC_FAST_DECODE=0"
    return unsupported(art)


def read_spec(art) -> LlamaSpec:
    cfg, m = art.config, art.manifest
    heads = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads") or heads
    bits = set(((m.get("runtime") or {}).get("kv_cache") or {}).values())
    kind = kind_of(art)
    return LlamaSpec(
        target=m["target"], kind=kind, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
        kv_heads=kvh,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied=bool(cfg.get("tie_word_embeddings", False)), kv_bits=4 if bits == {4} else None,
        engine=kind.engine(art),
        max_positions=cfg.get("max_position_embeddings"))
