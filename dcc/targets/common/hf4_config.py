"""config.json in the form transformers 4.x reads, from a transformers-5 config dict. transformers 5 keeps the RoPE
only in `rope_parameters` and writes `dtype`; 4.x (QServe pins 4.37.2, TinyChat 4.46.0) reads top-level `rope_theta`,
`rope_scaling` and `torch_dtype`, and takes its class default (theta 10000) where they are missing. Also the reading
of a config's RoPE that the engines' checks share."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_THETA = 10000.0   # every 4.x and 5.x config class of the engines' families (Llama, Mistral, Qwen2)
# the rope types of transformers 5 (modeling_rope_utils.ROPE_INIT_FUNCTIONS, without its non-text ones)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# rope_scaling keys that transformers 4.46.0 requires per type (modeling_rope_utils.py, _validate_*_parameters);
# 4.37.2's LlamaConfig takes only {"type": "linear" | "dynamic", "factor": float > 1}, exactly those two keys
HF4_REQUIRED = {"linear": {"factor"}, "dynamic": {"factor"}, "yarn": {"factor"},
                "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
                "longrope": {"short_factor", "long_factor"}}
_NOT_SCALING = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


class EngineConfigError(ValueError):
    """A config.json that an engine's loader would refuse or fail on; the message says which field and why."""


class HF4Config:
    """A config as transformers 4.x's AutoConfig builds it from config.json: every key an attribute, over the
    defaults its config class sets for keys the file lacks; any other missing field raises AttributeError when
    read, as it does there. torch_dtype stays the string of the file (4.x turns it into a torch.dtype)."""

    def __init__(self, cfg: dict, defaults: dict):
        self.__dict__.update({**defaults, **cfg})


def hf4_rope_scaling_error(rope_scaling, version: str) -> str | None:
    """Why transformers `version` (4.37.2 or 4.46.0) refuses this rope_scaling when it builds a Llama or Qwen2
    config; None where it takes it. 4.37.2: LlamaConfig._rope_scaling_validation; 4.46.0: rope_config_validation."""
    if rope_scaling is None:
        return None
    if version == "4.37.2":
        rs = rope_scaling
        ok = (isinstance(rs, dict) and len(rs) == 2 and rs.get("type") in ("linear", "dynamic")
              and isinstance(rs.get("factor"), float) and rs["factor"] > 1.0)
        return None if ok else f"rope_scaling {rs} is not {{'type': 'linear' | 'dynamic', 'factor': float > 1}}"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    missing = HF4_REQUIRED.get(rope_type, set()) - set(rope_scaling)
    return f"rope_scaling of type {rope_type} lacks {sorted(missing)}" if missing else None


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: its type, base, the variant's parameters (factor, ...) and the rotated share of a head."""
    type: str = "default"
    theta: float = DEFAULT_THETA
    scaling: dict = field(default_factory=dict)
    partial_rotary_factor: float = 1.0

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.scaling.items() if not isinstance(v, list))
        part = f", partial_rotary_factor {self.partial_rotary_factor}" if self.partial_rotary_factor != 1.0 else ""
        return f"{self.type} (theta {self.theta:g}{extra}{part})"


def _rope(p: dict, cfg: dict) -> Rope:
    return Rope(type=p.get("rope_type", p.get("type", "default")),
                theta=float(p.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))),
                scaling={k: v for k, v in p.items() if k not in _NOT_SCALING},
                partial_rotary_factor=float(p.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)))


def ropes(cfg: dict) -> dict[str, Rope]:
    """The RoPE of a config dict by layer type: {"": rope} where one serves every layer, {layer type: rope} where
    transformers 5 nests them (Gemma 3), {} for a model without RoPE. Reads 5.x's rope_parameters, or a 4.x
    config's top-level rope_theta / rope_scaling."""
    rp = cfg.get("rope_parameters")
    if not rp:
        if "rope_theta" not in cfg and not cfg.get("rope_scaling"):
            return {}
        rp = dict(cfg.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rp.values()):
        return {k: _rope(v, cfg) for k, v in rp.items() if isinstance(v, dict)}
    return {"": _rope(rp, cfg)}


def shared_rope(by_type: dict[str, Rope]) -> Rope | None:
    """The rope every layer type uses, or None where they differ (or there is none)."""
    distinct = {repr(r): r for r in by_type.values()}
    return next(iter(distinct.values())) if len(distinct) == 1 else None


def rope_scaling(rope: Rope) -> dict | None:
    """rope_scaling as transformers 4.x reads it: None for plain RoPE; linear and dynamic as {"type", "factor"} (the
    form both 4.37.2 and 4.46.0 accept: 4.46 copies "type" to "rope_type"); the other types as 4.46.0 names them,
    {"rope_type": ..., **parameters} (4.37.2 has none of them)."""
    if rope.type == "default":
        return None
    if rope.type in ("linear", "dynamic"):
        return {"type": rope.type, **rope.scaling, "factor": float(rope.scaling["factor"])}
    return {"rope_type": rope.type, **rope.scaling}


def to_hf4(cfg: dict, dtype: str) -> dict:
    """The config dict with what transformers 4.x reads added: torch_dtype (beside 5.x's dtype, which 4.x keeps as a
    plain attribute), top-level rope_theta and rope_scaling (written even when None: a 4.x config class without a
    rope_scaling field, e.g. 4.46's MistralConfig, otherwise has no such attribute), partial_rotary_factor where the
    RoPE has one. rope_parameters stays for transformers 5. RoPEs that differ by layer type have no 4.x form here
    and are left as they are (the engines' checks refuse them)."""
    out = {**cfg, "dtype": dtype, "torch_dtype": dtype}
    rope = shared_rope(ropes(cfg))
    if rope is not None:
        out["rope_theta"] = rope.theta
        out["rope_scaling"] = rope_scaling(rope)
        named = "partial_rotary_factor" in cfg or "partial_rotary_factor" in (cfg.get("rope_parameters") or {})
        if named or rope.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = rope.partial_rotary_factor
    return out


def plain_rope_problem(cfg: dict, engine: str, why: str) -> str | None:
    """Why an engine that applies only plain RoPE (base rope_theta over the whole head) cannot represent this
    config's RoPE, in one line; None where it can (or the model has no RoPE). `why` says where the engine shows it."""
    by_type = ropes(cfg)
    rope = shared_rope(by_type)
    if not by_type or (rope is not None and rope.type == "default" and rope.partial_rotary_factor == 1.0):
        return None
    if rope is None:
        per = "; ".join(f"{k}: {r.describe()}" for k, r in by_type.items())
        return (f"{engine} applies one plain RoPE to every layer ({why}); this model's RoPE differs by layer type "
                f"({per})")
    return (f"{engine} applies plain RoPE with rope_theta over the whole head only ({why}); this model's RoPE is "
            f"{rope.describe()}, which {engine} cannot represent, so its artifact would run with wrong positions")
