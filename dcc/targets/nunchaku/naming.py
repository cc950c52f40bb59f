"""Diffusers module paths -> Nunchaku's stored names: which model_class loads a diffusers model, which stored layer
(e.g. transformer_blocks.0.qkv_proj or transformer_blocks.0.attn.to_qkv) holds which diffusers linears in which row
order, the tensor-suffix spelling of each convention, and the stored row order of a fused weight.

The block grammar of each class is a regex over module paths; what a block holds is expected_keys.py's table (read
from Nunchaku's loaders). A diffusers class without a Nunchaku loader gets None: its artifact is dcc-runtime only."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import expected_keys as ek


class NamingError(ValueError):
    """Quantized paths that Nunchaku's format cannot hold; the message names the path or block and the rule."""


# diffusers class -> Nunchaku model_class (FLUX: "legacy" C++ names, which the V2 loader also reads through
# convert_flux_state_dict, or "v2" diffusers names)
_CLASSES = {
    "FluxTransformer2DModel": {"legacy": "NunchakuFluxTransformer2dModel", "v2": "NunchakuFluxTransformer2DModelV2"},
    "SanaTransformer2DModel": "NunchakuSanaTransformer2DModel",
    "QwenImageTransformer2DModel": "NunchakuQwenImageTransformer2DModel",
    "ZImageTransformer2DModel": "NunchakuZImageTransformer2DModel",
    "UNet2DConditionModel": "NunchakuSDXLUNet2DConditionModel",
}
_ONE_FAMILY = r"^(?P<prefix>(?P<family>transformer_blocks)\.\d+)\.(?P<local>.+)$"
_BLOCK_PATH = {   # the block grammar: prefix (the block), family (expected_keys block table), local (inside it)
    "FluxTransformer2DModel":
        r"^(?P<prefix>(?P<family>transformer_blocks|single_transformer_blocks)\.\d+)\.(?P<local>.+)$",
    "SanaTransformer2DModel": _ONE_FAMILY,
    "QwenImageTransformer2DModel": _ONE_FAMILY,
    "ZImageTransformer2DModel": r"^(?P<prefix>(?P<family>layers|noise_refiner|context_refiner)\.\d+)\.(?P<local>.+)$",
    # SDXL: the BasicTransformerBlocks of CrossAttn down / up blocks and of the mid block (unet_sdxl.py _patch_model)
    "UNet2DConditionModel": r"^(?P<prefix>(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\."
                            r"(?P<family>transformer_blocks)\.\d+)\.(?P<local>.+)$",
}
_REFINERS = ("noise_refiner", "context_refiner")


def nunchaku_model_class(diffusers_class: str, flux: str = "legacy") -> str | None:
    """The Nunchaku model_class that loads `diffusers_class`, or None where Nunchaku has no loader."""
    found = _CLASSES.get(diffusers_class)
    if isinstance(found, dict):
        if flux not in found:
            raise NamingError(f"flux={flux!r}: choose one of {sorted(found)}")
        return found[flux]
    return found


def stored_suffix(suffix: str, convention: str) -> str:
    """A W4A4 tensor suffix in the convention's spelling: smooth -> smooth_factor, smooth_orig -> smooth_factor_orig,
    lora_down -> proj_down, lora_up -> proj_up for the diffusers convention, and back for the legacy one (either
    spelling goes in; qweight, wscales, bias, wcscales, wtscale are the same in both)."""
    if convention not in ek.SUFFIX_RENAMES:
        raise NamingError(f"convention {convention!r} is not one of {sorted(ek.SUFFIX_RENAMES)}")
    legacy = {v: k for k, v in ek.SUFFIX_RENAMES[ek.DIFFUSERS].items()}.get(suffix, suffix)
    return ek.SUFFIX_RENAMES[convention].get(legacy, legacy)


@dataclass(frozen=True)
class StoredLayer:
    """One stored layer: its full stored prefix, expected_keys' rule and the full diffusers paths of its parts."""
    prefix: str
    layer: ek.Layer
    parts: tuple[str, ...]

    @property
    def kind(self) -> str:
        return self.layer.kind

    def unsigned(self, precision: str) -> bool:
        """u4 activations: the fc2 after GELU, INT4 only (NVFP4 keeps them signed, act_unsigned = precision != fp4)."""
        return self.layer.unsigned and precision == "int4"


@dataclass(frozen=True)
class NunchakuNames:
    model_class: str
    convention: str
    layers: tuple[StoredLayer, ...]
    renames: dict = field(default_factory=dict)   # full diffusers module prefix -> stored prefix (16-bit params)
    skip_refiners: bool | None = None             # Z-Image only: refiners kept in 16 bits

    def mapping(self) -> dict[str, list[str]]:
        """{stored prefix: [diffusers linear paths in fused row order]}."""
        return {s.prefix: list(s.parts) for s in self.layers}

    def suffix(self, suffix: str) -> str:
        return stored_suffix(suffix, self.convention)

    def stored_param(self, name: str) -> str | None:
        """The stored key of a diffusers state-dict key outside the stored layers (16-bit, renamed where the C++
        block names it differently), or None when the key belongs to a stored layer."""
        module = name.rsplit(".", 1)[0]
        if any(module in s.parts for s in self.layers):
            return None
        for src, dst in self.renames.items():
            if module == src or module.startswith(src + "."):
                return dst + name[len(src):]
        return name

    def dropped(self, biased: set[str]) -> list[str]:
        """The diffusers biases (of the paths in `biased`) that the engine has no place for (SANA attn1)."""
        return sorted(f"{p}.bias" for s in self.layers if s.layer.bias == "never" for p in s.parts if p in biased)


def _parse(diffusers_class: str, path: str) -> tuple[str, str, str] | None:
    m = re.match(_BLOCK_PATH[diffusers_class], path)
    return (m["prefix"], m["family"], m["local"]) if m else None


def nunchaku_linears(diffusers_class: str, paths, flux: str = "legacy") -> dict[str, str]:
    """Of the diffusers linear paths, those Nunchaku stores in 4 bits: {path: "w4a4" | "awq"} (what a spec assigner
    quantizes); {} for a class without a Nunchaku loader."""
    model_class = nunchaku_model_class(diffusers_class, flux)
    if model_class is None:
        return {}
    spec = ek.model_spec(model_class)
    out = {}
    for path in paths:
        parsed = _parse(diffusers_class, path)
        if parsed is None:
            continue
        _, family, local = parsed
        kinds = {layer.kind for layer in spec.blocks[family].layers if local in layer.parts} & {ek.W4A4, ek.AWQ}
        if kinds:
            out[path] = kinds.pop()
    return out


def nunchaku_names(diffusers_class: str, quantized_paths, all_paths=None, flux: str = "legacy") -> NunchakuNames | None:
    """The stored layers for a model whose linears at `quantized_paths` (diffusers names, W4A4 ones at least) are
    quantized. Every block holding a quantized path must have all of its W4A4 layers quantized (Nunchaku's classes
    quantize every block); with `all_paths` (every linear of the model) no block may be left out, except Z-Image's
    refiners, which may all stay 16-bit (skip_refiners). AWQ layers (AdaNorm) are listed for every block whether or
    not dcc quantized them. None for a class without a Nunchaku loader."""
    model_class = nunchaku_model_class(diffusers_class, flux)
    if model_class is None:
        return None
    spec = ek.model_spec(model_class)
    blocks: dict[str, tuple[str, set]] = {}
    for path in quantized_paths:
        parsed = _parse(diffusers_class, path)
        if parsed is None:
            raise NamingError(f"{path}: {model_class} quantizes only the blocks of its class (this path is outside "
                              f"them and stays 16-bit)")
        prefix, family, local = parsed
        if not any(local in layer.parts for layer in spec.blocks[family].layers if layer.kind in (ek.W4A4, ek.AWQ)):
            raise NamingError(f"{path}: {model_class} keeps this module in 16 bits; leave it unquantized")
        blocks.setdefault(prefix, (family, set()))[1].add(local)
    for path in all_paths or ():
        parsed = _parse(diffusers_class, path)
        if parsed is not None:
            blocks.setdefault(parsed[0], (parsed[1], set()))
    skip = _skip_refiners(spec, blocks)
    layers, renames = [], {}
    for prefix in sorted(blocks, key=_natural):
        family, quantized = blocks[prefix]
        block = ek.ZIMAGE_SKIPPED_REFINER if skip and family in _REFINERS else spec.blocks[family]
        for layer in block.layers:
            have = [p for p in layer.parts if p in quantized]
            if layer.kind == ek.W4A4 and len(have) != len(layer.parts):
                missing = [f"{prefix}.{p}" for p in layer.parts if p not in quantized]
                raise NamingError(f"{prefix}.{layer.name}: {model_class} stores {'+'.join(layer.parts)} as one W4A4 "
                                  f"layer; {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not quantized")
            layers.append(StoredLayer(f"{prefix}.{layer.name}", layer, tuple(f"{prefix}.{p}" for p in layer.parts)))
        renames.update({f"{prefix}.{src}": f"{prefix}.{dst}" for src, dst in block.renames})
    return NunchakuNames(model_class, spec.convention, tuple(layers), renames,
                         skip if spec.model_class == "NunchakuZImageTransformer2DModel" else None)


def _skip_refiners(spec: ek.ModelSpec, blocks: dict) -> bool:
    refiners = [q for fam, q in blocks.values() if fam in _REFINERS]
    if not refiners or all(q for q in refiners):
        return False
    if any(q for q in refiners):
        raise NamingError(f"{spec.model_class}: either every noise_refiner / context_refiner block is quantized or "
                          f"none (quantization_config skip_refiners is one flag)")
    return True


def _natural(prefix: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", prefix)]


# ---------------------------------------------------------------------------------------------- stored row order

def stored_shape(sl: StoredLayer, shapes: dict) -> tuple[int, int]:
    """(N, K) of a stored layer before the engine's 128-padding, from {diffusers path: (out_features, in_features)}
    of its parts (SANA's sections already padded as its C++ module allocates them)."""
    outs = [shapes[p][0] for p in sl.parts]
    ins = {shapes[p][1] for p in sl.parts}
    if len(ins) != 1:
        raise NamingError(f"{sl.prefix}: fused parts {list(sl.parts)} read different input widths {sorted(ins)}")
    k = ins.pop()
    rows, cols = sl.layer.rows, sl.layer.cols
    if cols == "attn":                      # proj_out [D, D + mlp]: attention columns [:D]
        return outs[0], outs[0]
    if cols == "mlp":
        return outs[0], k - outs[0]
    if rows == "sana_qkv":
        return 3 * ek._pad(outs[0], 128), k
    if rows == "sana_glu":
        return 2 * ek._pad(outs[0] // 2, 64), k
    return sum(outs), k


def stored_rows(sl: StoredLayer, parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows (weights [out, ...] or biases [out]) in the stored order of the layer (expected_keys.Layer:
    concat, adanorm interleave, SANA's padded q|k,v-per-head sections and GLU interleave), new zero rows where the
    engine pads. Columns are untouched (the FLUX single block's column split is stored_cols)."""
    rows = sl.layer.rows
    if rows == "concat":
        return torch.cat(parts, 0)
    t = parts[0]
    if rows == "adanorm":                   # stored row d*S + j = diffusers row j*D + d
        s = sl.layer.splits
        return t.reshape(s, t.shape[0] // s, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    if rows == "sana_glu":                  # row 2c = value c, 2c + 1 = gate c; c padded to a multiple of 64
        hd = t.shape[0] // 2
        hp = ek._pad(hd, 64)
        out = t.new_zeros(hp, 2, *t.shape[1:])
        out[:hd, 0], out[:hd, 1] = t[:hd], t[hd:]
        return out.reshape(2 * hp, *t.shape[1:])
    if rows == "sana_qkv":                  # [q | pad] then per head h: [k_h | v_h] (32 rows each)
        q, k, v = parts
        d, dp = q.shape[0], ek._pad(q.shape[0], 128)
        out = q.new_zeros(3 * dp, *q.shape[1:])
        out[:d] = q
        kv = out[dp:].view(dp // 32, 2, 32, *q.shape[1:])
        kv[: d // 32, 0] = k.reshape(d // 32, 32, *q.shape[1:])
        kv[: d // 32, 1] = v.reshape(d // 32, 32, *q.shape[1:])
        return out
    raise NamingError(f"{sl.prefix}: unknown row order {rows!r}")


def stored_cols(sl: StoredLayer, weight: torch.Tensor) -> torch.Tensor:
    """The columns of a (row-arranged) weight the stored layer reads: the FLUX single block's proj_out split."""
    n = weight.shape[0]
    if sl.layer.cols == "attn":
        return weight[:, :n].contiguous()
    if sl.layer.cols == "mlp":
        return weight[:, n:].contiguous()
    return weight


def stored_bias(sl: StoredLayer, biases: list[torch.Tensor | None], n: int) -> torch.Tensor | None:
    """The stored bias [n] (before padding) per the layer's bias rule, with the AdaNorm +1 folded into the scale rows
    (Nunchaku's AdaNorm adds no 1: deepcompressor utils.py convert_to_nunchaku_w4x16_linear_weight, delta[1] =
    delta[-2] = 1, i.e. scale_msa and scale_mlp), or None where the engine has no bias."""
    rule, has = sl.layer.bias, [b is not None for b in biases]
    if any(has) and not all(has):
        raise NamingError(f"{sl.prefix}: fused parts {list(sl.parts)} mix biased and unbiased linears")
    if rule == "never" or (rule == "diffusers" and not any(has)):
        if sl.layer.rows == "adanorm":
            raise NamingError(f"{sl.prefix}: the AdaNorm linear has no bias to hold the folded +1 of its scales")
        return None
    bias = torch.zeros(n) if rule == "zeros" or not any(has) else stored_rows(sl, list(biases)).clone()
    if sl.layer.rows == "adanorm":
        s = sl.layer.splits
        for j in {1, s - 2}:                # shift, scale, gate (, shift, scale, gate): the scale chunks
            bias.view(-1, s)[:, j] += 1
    return bias
