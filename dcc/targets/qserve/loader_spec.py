"""What QServe's loader does with a checkpoint, written down from its source as a spec that an artifact is checked
against (the judge of `dcc validate` and of the manifest's `engines`), replacing dcc's own idea of the layout.

Source: mit-han-lab/qserve @ 5b44fe6 -- qserve/modeling/models/llama_w4a8_unpad.py and llama_w8a8_unpad.py
(LlamaForCausalLM.__init__ and load_weights), qserve/modeling/layers/quantized_linear/w4a8_linear.py and
w8a8_linear.py (the buffers), qserve/utils/quant_config.py (no packed or transposed tensors):

- The model is built from config.json alone: head_dim = hidden_size // num_attention_heads (config.head_dim is not
  used by the model), qkv_proj [(heads + 2 kv_heads) head_dim, hidden], gate_up_proj [2 intermediate, hidden],
  lm_head nn.Linear(hidden, vocab) freshly initialised. W4A8OF16LinearDynamicInputScale asserts K % group == 0 and
  N % 8 == 0; its buffers: qweight int8 [N, K/2], s1_scales fp16 [N], per channel s1_szeros fp16 [N], per group
  s2_scales and s2_zeros int8 [K/G, N], bias fp16 [N] where attention_bias. W8A8: weight int8 [N, K], dequant_scale
  [N], no bias buffers.
- load_weights walks every tensor of the checkpoint: names holding "rotary_emb.inv_freq" are skipped; W4A8 skips
  every name holding "norm" (its RMSNormGeneral gains stay 1), W8A8 every name holding "bias". A name holding
  q_proj / k_proj / v_proj goes into qkv_proj at row offsets 0, hidden, hidden + kv (columns for s2_*), gate_proj /
  up_proj into the halves of gate_up_proj; every other name must be a parameter of the model (state_dict[name]:
  a KeyError otherwise), embed_tokens and lm_head copied into the first rows. Slices are checked by `assert
  param_slice.shape == loaded_weight.shape`; copy_ casts dtypes silently.
- Nothing ties lm_head to embed_tokens: a checkpoint without lm_head.weight runs with a random head.
- W8A8's attention kernels take rotary_base = 10000 whatever config.rope_theta says (W4A8 passes rope_theta).
"""
from __future__ import annotations

import torch

SOURCE = "mit-han-lab/qserve@5b44fe6164020f6e40bdc2d4d430491a91b1a814"
W8A8_ROPE_THETA = 10000.0


def model_params(cfg: dict, fmt: str, group_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of QServe's LlamaForCausalLM parameters and buffers, built from the config as QServe
    builds them (the model is .half()-ed, so 16-bit tensors are fp16)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = h // heads
    f16 = torch.float16
    out = {"model.embed_tokens.weight": (f16, (v, h)), "model.norm.weight": (f16, (h,)), "lm_head.weight": (f16, (v, h))}
    lins = {"self_attn.qkv_proj": ((heads + 2 * kv) * hd, h), "self_attn.o_proj": (h, heads * hd),
            "mlp.gate_up_proj": (2 * inter, h), "mlp.down_proj": (h, inter)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (f16, (h,))
        out[f"{p}.post_attention_layernorm.weight"] = (f16, (h,))
        for lin, (n, k) in lins.items():
            q = f"{p}.{lin}"
            if fmt == "qserve-w8a8":
                out[f"{q}.weight"], out[f"{q}.dequant_scale"] = (torch.int8, (n, k)), (f16, (n,))
                continue
            out[f"{q}.qweight"], out[f"{q}.s1_scales"] = (torch.int8, (n, k // 2)), (f16, (n,))
            if fmt == "qserve-w4a8-group":
                out[f"{q}.s2_scales"] = out[f"{q}.s2_zeros"] = (torch.int8, (k // group_size, n))
            else:
                out[f"{q}.s1_szeros"] = (f16, (n,))
            if lin.startswith("self_attn") and cfg.get("attention_bias"):
                out[f"{q}.bias"] = (f16, (n,))
    return out


def config_problems(cfg: dict, fmt: str, group_size: int) -> list[str]:
    """What QServe's model construction gets wrong or refuses for this config, one line each ([] if nothing)."""
    out = []
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    if hd * heads != h or h % heads:
        out.append(f"head_dim {hd} x {heads} heads != hidden_size {h}: QServe's model takes head_dim = hidden_size "
                   f"// num_attention_heads")
    if fmt == "qserve-w8a8":
        theta = float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
        if theta != W8A8_ROPE_THETA:
            out.append(f"rope_theta {theta:g}: QServe's W8A8 attention kernels rotate with base 10000 whatever the "
                       f"config says")
    if fmt == "qserve-w4a8-group":
        for name, k in (("hidden_size", h), ("intermediate_size", cfg["intermediate_size"])):
            if k % group_size:
                out.append(f"{name} {k} is not a multiple of the group size {group_size} (W4A8OF16 asserts it)")
    return out


def _slice(name: str, cfg: dict, param_shape: tuple[int, ...], fmt: str) -> tuple[int, int, int] | None:
    """(dim, start, size) of the slice of a fused parameter that a q/k/v or gate/up tensor fills; None otherwise."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    kv_rows = h // heads * kv
    column = fmt != "qserve-w8a8" and ("s2_scales" in name or "s2_zeros" in name)
    for proj, size, offset in (("q_proj", h, 0), ("k_proj", kv_rows, h), ("v_proj", kv_rows, h + kv_rows)):
        if proj in name:
            return (1 if column else 0, offset, size)
    for stride, proj in enumerate(("gate_proj", "up_proj")):
        if proj in name:
            dim = 1 if column else 0
            half = param_shape[dim] // 2
            return (dim, stride * half, half)
    return None


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def check(tensors, cfg: dict, fmt: str, group_size: int) -> list[str]:
    """Problems (one line each) QServe's loader and model would have with an artifact whose tensors are `tensors`
    (an index with .keys() and .get(name) -> tensor) and whose config is `cfg`; [] if it loads and runs as compiled."""
    problems = config_problems(cfg, fmt, group_size)
    params = model_params(cfg, fmt, group_size)
    filled: dict[str, int] = {}   # parameter -> elements copied into it
    w4 = fmt != "qserve-w8a8"
    for name in sorted(tensors.keys()):
        t = tensors.get(name)
        if "rotary_emb.inv_freq" in name:
            continue
        if w4 and "norm" in name:
            if not bool((t.float() == 1).all()):
                problems.append(f"{name}: QServe's W4A8 loader skips norm weights (gains stay 1), but this one is "
                                f"not 1 (fold it into the next linears: fuse_norms)")
            continue
        if not w4 and "bias" in name:
            if bool(t.float().abs().max() > 0):
                problems.append(f"{name}: QServe's W8A8 loader skips every bias, but this one is not 0")
            continue
        dest = name
        for proj, fused in (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                            ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj")):
            if proj in name:
                dest = name.replace(proj, fused)
                break
        if dest not in params:
            problems.append(f"{name}: QServe's model has no {dest} (load_weights raises KeyError)")
            continue
        dtype, shape = params[dest]
        if not _same_kind(t.dtype, dtype):
            problems.append(f"{name}: {t.dtype}, QServe's {dest} is {dtype} (copy_ would cast the codes)")
        sl = _slice(name, cfg, shape, fmt)
        want = list(shape)
        got = tuple(t.shape)
        if sl is not None:
            dim, start, size = sl
            want[dim] = max(0, min(size, shape[dim] - start))
            # the loader first cuts the tensor's rows to the shard size (a no-op unless it is larger)
            got = (min(got[0], size),) + got[1:] if got else got
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            want[0] = min(got[0], shape[0]) if got else want[0]   # copied into the first rows
        if tuple(want) != got:
            problems.append(f"{name}: shape {tuple(t.shape)}, QServe copies it into {dest}{' slice' if sl else ''} "
                            f"of shape {tuple(want)} (assertion fails)")
            continue
        filled[dest] = filled.get(dest, 0) + int(torch.Size(got).numel())
    for dest, (_, shape) in params.items():
        if w4 and "norm" in dest:
            continue
        need = int(torch.Size(shape).numel())
        if filled.get(dest, 0) < need:
            why = (" (QServe does not tie it to embed_tokens: the head would stay randomly initialised)"
                   if dest == "lm_head.weight" else "")
            problems.append(f"{dest}: {'never' if dest not in filled else 'partly'} loaded{why}")
    return problems
