"""Run a transformers module as a W*A8(KV4) engine would: forward pre-hooks quantize the inputs of the chosen linears
per token (int8), and an attention function registered with transformers quantizes K (after RoPE) and V per token
and head before attention; it can also hand post-RoPE queries and keys to an observer (SmoothAttention's statistics).
Outside `simulate` the module runs unchanged (plain sdpa)."""
from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn

from .actquant import fake_quantize_kv, fake_quantize_tokens_int8

ATTN_IMPL = "dcc"
_registered = False


def _attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention call with K/V as the engine's cache holds them. query [B, H, T, D]; key and value
    [B, kv_heads, T, D], after RoPE and before the GQA repeat, so the per-head statistics are the engine's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    observer = getattr(module, "_dcc_observer", None)
    if observer is not None:
        observer(query, key)
    bits = getattr(module, "_dcc_kv_bits", None)
    if bits:
        key, value = fake_quantize_kv(key, bits), fake_quantize_kv(value, bits)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(ATTN_IMPL, _attention)
        _registered = True


def _act_hook(mod, args, kwargs):
    x = args[0] if args else kwargs["input"]
    xq = fake_quantize_tokens_int8(x)
    if args:
        return (xq,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "input": xq}


@contextlib.contextmanager
def simulate(root: nn.Module, act: dict[str, str] | None = None, kv: dict[str, int] | None = None,
             observers: dict[str, Callable] | None = None):
    """act: linear path (relative to root) -> "int8" (per-token inputs); kv: attention module path -> cache bits;
    observers: attention module path -> fn(query, key) called on post-RoPE tensors. Restores everything on exit."""
    act, kv, observers = act or {}, kv or {}, observers or {}
    for name, kind in act.items():
        if kind != "int8":
            raise ValueError(f"{name}: activation format {kind!r} is not simulated (only 'int8' per token)")
    hooks, marked, configs = [], [], {}
    try:
        for name in act:
            hooks.append(root.get_submodule(name).register_forward_pre_hook(_act_hook, with_kwargs=True))
        attn_paths = set(kv) | set(observers)
        if attn_paths:
            register()
            for path in attn_paths:
                mod = root.get_submodule(path)
                cfg = getattr(mod, "config", None)
                if cfg is None or not hasattr(cfg, "_attn_implementation"):
                    raise ValueError(f"{path}: {type(mod).__name__} has no transformers config to route attention "
                                     f"through dcc's KV simulation")
                configs[id(cfg)] = (cfg, cfg._attn_implementation)
                mod._dcc_kv_bits = kv.get(path)
                mod._dcc_observer = observers.get(path)
                marked.append(mod)
            for cfg, _ in configs.values():
                cfg._attn_implementation = ATTN_IMPL
        yield
    finally:
        for h in hooks:
            h.remove()
        for mod in marked:
            mod._dcc_kv_bits = None
            mod._dcc_observer = None
        for cfg, old in configs.values():
            cfg._attn_implementation = old


def attention_module(linear_path: str) -> str:
    """The attention module owning a q/k/v/o linear: 'self_attn.q_proj' -> 'self_attn'."""
    return linear_path.rpartition(".")[0]



def install_kv(root: nn.Module, kv: dict[str, int]) -> None:
    """Permanently route these attention modules through the KV cache simulation (the runtime's reference model)."""
    register()
    for path, bits in kv.items():
        mod = root.get_submodule(path)
        mod._dcc_kv_bits, mod._dcc_observer = bits, None
        mod.config._attn_implementation = ATTN_IMPL
