"""What QServe's Llama loader expects of a checkpoint (research/targets.md 1A; qserve/modeling/models/
llama_w4a8_unpad.py): per quantized linear the keys, dtypes and shapes it copies into its fused qkv_proj /
gate_up_proj buffers. `check` compares an artifact's tensors with it and names every mismatch."""
from __future__ import annotations

import torch

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """[N, K] of each projection of a Llama-style decoder layer."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    return {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
            "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


def expected(config: dict, fmt: str, group_size: int, prefix: str = "model.layers") -> dict[str, tuple]:
    """name -> (dtype, shape) of every quantized tensor the loader reads."""
    out = {}
    for i in range(config["num_hidden_layers"]):
        for proj, (n, k) in linear_shapes(config).items():
            p = f"{prefix}.{i}.{proj}"
            if fmt == "qserve-w8a8":
                out[f"{p}.weight"] = (torch.int8, (n, k))
                out[f"{p}.dequant_scale"] = (torch.float16, (n,))
                continue
            out[f"{p}.qweight"] = (torch.int8, (n, k // 2))
            out[f"{p}.s1_scales"] = (torch.float16, (n,))
            if fmt == "qserve-w4a8-group":
                out[f"{p}.s2_scales"] = (torch.int8, (k // group_size, n))
                out[f"{p}.s2_zeros"] = (torch.int8, (k // group_size, n))
            else:
                out[f"{p}.s1_szeros"] = (torch.float16, (n,))
    return out


def check(tensors, config: dict, fmt: str, group_size: int) -> list[str]:
    """Problems (one line each) between an artifact's tensor index and what the loader expects; [] if it loads."""
    problems = []
    have = set(tensors.keys())
    for name, (dtype, shape) in expected(config, fmt, group_size).items():
        if name not in have:
            problems.append(f"{name}: missing")
            continue
        t = tensors.get(name)
        if t.dtype != dtype or tuple(t.shape) != shape:
            problems.append(f"{name}: {t.dtype} {tuple(t.shape)}, the loader expects {dtype} {shape}")
    for name in sorted(have):
        if name.endswith(".weight") and any(f".{p}." in name for p in PROJ) and fmt != "qserve-w8a8":
            problems.append(f"{name}: a 16-bit weight where the W4A8 loader expects qweight")
        if "norm" in name and fmt != "qserve-w8a8":
            # the W4A8 loader skips every *norm* key and keeps the gains at 1: they must have been folded
            t = tensors.get(name)
            if not bool((t.float() == 1).all()):
                problems.append(f"{name}: QServe's W4A8 loader ignores norm weights, but this one is not 1 "
                                f"(fold it into the next linears: fuse_norms)")
    return problems
