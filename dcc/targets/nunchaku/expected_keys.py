"""What Nunchaku's loaders read from a single-file checkpoint, per model class: the stored layers of each block (W4A4
SVDQuant, AWQ W4A16 or 16-bit), the diffusers linears fused into each and their row order, the unsigned fc2 layers,
every tensor's key suffix, shape (a function of N, K and the rank) and dtype for INT4 and NVFP4, and the metadata keys.

Written down from nunchaku-ai/nunchaku @ 92e46957cdb8d345bfda0d0eb31f24fa6127d4e7 (2026-02-12, 1.3.0dev) and, for
the conversion steps the loaders take for granted, mit-han-lab/deepcompressor @ 69f3473f5e1c1504bae35cc50c7858ef900a9b17
(deepcompressor/backend/nunchaku/convert.py, utils.py; deepcompressor/nn/patch/linear.py). Each table cites the file
it comes from. Facts, not code: nothing here imports or copies Nunchaku. naming.py applies these tables to module
paths; layout.py / layout_awq.py pack the tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUNCHAKU_REPO = "nunchaku-ai/nunchaku"
NUNCHAKU_COMMIT = "92e46957cdb8d345bfda0d0eb31f24fa6127d4e7"
DEEPCOMPRESSOR_COMMIT = "69f3473f5e1c1504bae35cc50c7858ef900a9b17"

W4A4, AWQ, DENSE, DWCONV = "w4a4", "awq", "dense", "dwconv"    # layer kinds
LEGACY, DIFFUSERS = "legacy", "diffusers"                         # key-naming conventions
PRECISIONS = ("int4", "nvfp4")
GROUP_SIZE = {"int4": 64, "nvfp4": 16}
AWQ_GROUP_SIZE = 64                      # gemv_awq's only group (src/Linear.cpp GEMV_AWQ)
SHIFT_GELU = 0.171875                    # the u4 shift of fc2 inputs (gemm_w4a4_launch_impl.cuh), INT4 only


class SpecError(ValueError):
    """A checkpoint (or a request) that Nunchaku's loader would reject; the message names the key and the rule."""


@dataclass(frozen=True)
class Layer:
    """One stored layer of a block as Nunchaku's loader builds it.

    name: stored name inside the block; parts: the diffusers modules (inside the block) fused into it, in row order;
    unsigned: INT4 activations are u4 (the fc2 after GELU; signed for NVFP4); rows: concat | adanorm (row d*S + j is
    diffusers row j*D + d, S = splits, +1 folded into the scale rows' bias) | sana_qkv | sana_glu (below);
    cols: all | attn | mlp (FLUX single block: proj_out [D, D + 4D] read by columns [:D] and [D:]);
    bias: diffusers (present iff the diffusers module has one) | always (the engine allocates one: zeros if diffusers
    has none) | zeros (present, all zero: the bias lives in the other half) | never (the engine has none: a diffusers
    bias is dropped)."""
    name: str
    kind: str
    parts: tuple[str, ...]
    unsigned: bool = False
    rows: str = "concat"
    splits: int = 0
    cols: str = "all"
    bias: str = "diffusers"


@dataclass(frozen=True)
class Block:
    """The stored layers of one block family, the 16-bit parameters it renames (diffusers local prefix -> stored local
    prefix; all others keep their names) and the ones the engine has no place for (dropped)."""
    layers: tuple[Layer, ...]
    renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    model_class: str
    diffusers_class: str
    convention: str            # LEGACY (C++ module names) or DIFFUSERS (diffusers paths + SVDQW4A4Linear names)
    blocks: dict               # block family (e.g. "transformer_blocks") -> Block
    metadata: tuple[str, ...]  # metadata keys the loader reads (json strings); all of them are required by someone
    pads: bool                 # C++ GEMM_W4A4 pads N, K to 128 itself; the Python SVDQW4A4Linear takes N, K exactly
    strict: bool               # load_state_dict(strict=True): an unexpected or missing key is an error
    source: str


def _L(name, kind, *parts, **kw) -> Layer:
    return Layer(name, kind, tuple(parts), **kw)


# ---------------------------------------------------------------------------------------------- FLUX.1, C++ engine
# nunchaku/models/transformers/transformer_flux.py (from_pretrained: keys under transformer_blocks. and
# single_transformer_blocks. go to the C++ model through loadDict(sd, partial=True), so a MISSING key is silently left
# uninitialised; the rest is load_state_dict(strict=False)); src/FluxModel.cpp (JointTransformerBlock,
# FluxSingleTransformerBlock, AdaLayerNormZero(Single): GEMV_AWQ linear, split_mod<6|3> reads row d*S + j, and
# mul_add_batch(x, scale, .., 0.0, shift) adds no +1: it is folded into the bias; dims hard-coded: 3072, 24 heads,
# 19 + 38 blocks); src/Linear.cpp (GEMM_W4A4: every layer here is built with bias=true). Names and fusion order:
# deepcompressor convert.py convert_to_nunchaku_flux_(single_)transformer_block_state_dict; the single block's
# proj_out is split by ConcatLinear with the bias on the last part (mlp_fc2), nn/patch/linear.py.
_FLUX_DOUBLE_LEGACY = Block(
    layers=(
        _L("norm1.linear", AWQ, "norm1.linear", rows="adanorm", splits=6, bias="always"),
        _L("norm1_context.linear", AWQ, "norm1_context.linear", rows="adanorm", splits=6, bias="always"),
        _L("qkv_proj", W4A4, "attn.to_q", "attn.to_k", "attn.to_v", bias="always"),
        _L("qkv_proj_context", W4A4, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", bias="always"),
        _L("out_proj", W4A4, "attn.to_out.0", bias="always"),
        _L("out_proj_context", W4A4, "attn.to_add_out", bias="always"),
        _L("mlp_fc1", W4A4, "ff.net.0.proj", bias="always"),
        _L("mlp_fc2", W4A4, "ff.net.2", unsigned=True, bias="always"),
        _L("mlp_context_fc1", W4A4, "ff_context.net.0.proj", bias="always"),
        _L("mlp_context_fc2", W4A4, "ff_context.net.2", unsigned=True, bias="always"),
    ),
    renames=(("attn.norm_q", "norm_q"), ("attn.norm_k", "norm_k"), ("attn.norm_added_q", "norm_added_q"),
             ("attn.norm_added_k", "norm_added_k")),
)
_FLUX_SINGLE_LEGACY = Block(
    layers=(
        _L("norm.linear", AWQ, "norm.linear", rows="adanorm", splits=3, bias="always"),
        _L("qkv_proj", W4A4, "attn.to_q", "attn.to_k", "attn.to_v", bias="always"),
        _L("out_proj", W4A4, "proj_out", cols="attn", bias="zeros"),
        _L("mlp_fc1", W4A4, "proj_mlp", bias="always"),
        _L("mlp_fc2", W4A4, "proj_out", cols="mlp", unsigned=True, bias="always"),
    ),
    renames=(("attn.norm_q", "norm_q"), ("attn.norm_k", "norm_k")),
)

# ---------------------------------------------------------------------------------------------- FLUX.1, Python V2
# nunchaku/models/transformers/transformer_flux_v2.py (NunchakuFluxAttention: to_qkv = fuse_linears([to_q, to_k,
# to_v]), add_qkv_proj likewise; NunchakuFluxSingleTransformerBlock: mlp_fc1 = proj_mlp, mlp_fc2 and attn.to_out both
# from proj_out (bias=True each), act_unsigned = precision != "nvfp4"; blocks built with scale_shift=0;
# from_pretrained: convert_flux_state_dict (legacy names accepted), patch_scale_key, load_state_dict strict);
# nunchaku/models/attention.py (NunchakuFeedForward: net[2].act_unsigned for INT4); normalization.py
# (NunchakuAdaLayerNormZero(Single): AWQW4A16Linear, emb.view(B, -1, 6|3)).
_FLUX_DOUBLE_V2 = Block(layers=(
    _L("norm1.linear", AWQ, "norm1.linear", rows="adanorm", splits=6),
    _L("norm1_context.linear", AWQ, "norm1_context.linear", rows="adanorm", splits=6),
    _L("attn.to_qkv", W4A4, "attn.to_q", "attn.to_k", "attn.to_v"),
    _L("attn.add_qkv_proj", W4A4, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    _L("attn.to_out.0", W4A4, "attn.to_out.0"),
    _L("attn.to_add_out", W4A4, "attn.to_add_out"),
    _L("ff.net.0.proj", W4A4, "ff.net.0.proj"),
    _L("ff.net.2", W4A4, "ff.net.2", unsigned=True),
    _L("ff_context.net.0.proj", W4A4, "ff_context.net.0.proj"),
    _L("ff_context.net.2", W4A4, "ff_context.net.2", unsigned=True),
))
_FLUX_SINGLE_V2 = Block(layers=(
    _L("norm.linear", AWQ, "norm.linear", rows="adanorm", splits=3),
    _L("attn.to_qkv", W4A4, "attn.to_q", "attn.to_k", "attn.to_v"),
    _L("attn.to_out", W4A4, "proj_out", cols="attn", bias="zeros"),
    _L("mlp_fc1", W4A4, "proj_mlp"),
    _L("mlp_fc2", W4A4, "proj_out", cols="mlp", unsigned=True),
))

# ---------------------------------------------------------------------------------------------- SANA, C++ engine
# nunchaku/models/transformers/transformer_sana.py (keys under transformer_blocks. -> loadDict(sd, partial=True));
# nunchaku/csrc/sana.h (built from config num_layers, num_attention_heads, attention_head_dim,
# num_cross_attention_heads, mlp_ratio); src/SanaModel.cpp:
#   SanaLinearAttention(dim, bias=false): qkv_proj GEMM_W4A4(dim -> 3 * dim_pad), out_proj (dim_pad -> dim), both
#     WITHOUT bias (diffusers attn1.to_out.0.bias is not read); HEAD_DIM 32 (attention_head_dim must be 32);
#     pag_to_v (dim -> dim_pad) only on layers named in pag_layers at load time (not written here).
#   MultiHeadCrossAttention: q_linear W4A4 (bias), kv_linear GEMM_F16 (16-bit [2D, D] + bias, rows [k; v]),
#     out_proj W4A4 (bias).
#   SanaGLUMBConv: inverted_conv W4A4 (D -> 2H', bias) with a fused SiLU epilogue, depth_conv DWCONV (16-bit weight
#     [2H', 3, 3, 1], bias), point_conv W4A4 (H' -> D, no bias) whose quantize fuses the GLU, H' = ceil(round(
#     mlp_ratio * D) / 64) * 64.
#   rows "sana_qkv" (src/kernels/zgemm/epilogues.cuh EpilogueLiteLA): N = 3 * dim_pad, dim_pad = ceil(D / 128) * 128;
#     rows [0, dim_pad) = q (zero past D); row dim_pad + 64h + j = k[32h + j] and dim_pad + 64h + 32 + j = v[32h + j]
#     for head h < dim_pad / 32 (each 128-row block holds two heads as [k_h | v_h | k_h+1 | v_h+1]).
#   rows "sana_glu" (gemm_base.cuh load_act_to_fpsum<fuse_glu>: out[c] = x[2c] * silu(x[2c + 1])): N = 2H', row 2c
#     = value row c, row 2c + 1 = gate row Hd + c (diffusers chunk(2): value first), zero for c >= Hd; the depthwise
#     conv's channels follow the same order.
_SANA_BLOCK = Block(
    layers=(
        _L("attn.qkv_proj", W4A4, "attn1.to_q", "attn1.to_k", "attn1.to_v", rows="sana_qkv", bias="never"),
        _L("attn.out_proj", W4A4, "attn1.to_out.0", bias="never"),
        _L("cross_attn.q_linear", W4A4, "attn2.to_q", bias="always"),
        _L("cross_attn.kv_linear", DENSE, "attn2.to_k", "attn2.to_v", bias="always"),
        _L("cross_attn.out_proj", W4A4, "attn2.to_out.0", bias="always"),
        _L("ff.inverted_conv", W4A4, "ff.conv_inverted", rows="sana_glu", bias="always"),
        _L("ff.depth_conv", DWCONV, "ff.conv_depth", rows="sana_glu", bias="always"),
        _L("ff.point_conv", W4A4, "ff.conv_point", bias="never"),
    ),
)

# ---------------------------------------------------------------------------------------------- Qwen-Image
# nunchaku/models/transformers/transformer_qwenimage.py (NunchakuQwenAttention: to_qkv = [to_q, to_k, to_v],
# add_qkv_proj = [add_q_proj, add_k_proj, add_v_proj]; img_mod[1] / txt_mod[1] AWQW4A16Linear; mod_params.view(B, -1,
# 6).transpose(1, 2): row d*6 + j; scale_shift=0; NunchakuFeedForward for img_mlp / txt_mlp; from_pretrained:
# patch_scale_key then load_state_dict strict, no name conversion).
_QWEN_BLOCK = Block(layers=(
    _L("img_mod.1", AWQ, "img_mod.1", rows="adanorm", splits=6),
    _L("txt_mod.1", AWQ, "txt_mod.1", rows="adanorm", splits=6),
    _L("attn.to_qkv", W4A4, "attn.to_q", "attn.to_k", "attn.to_v"),
    _L("attn.add_qkv_proj", W4A4, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    _L("attn.to_out.0", W4A4, "attn.to_out.0"),
    _L("attn.to_add_out", W4A4, "attn.to_add_out"),
    _L("img_mlp.net.0.proj", W4A4, "img_mlp.net.0.proj"),
    _L("img_mlp.net.2", W4A4, "img_mlp.net.2", unsigned=True),
    _L("txt_mlp.net.0.proj", W4A4, "txt_mlp.net.0.proj"),
    _L("txt_mlp.net.2", W4A4, "txt_mlp.net.2", unsigned=True),
))

# ---------------------------------------------------------------------------------------------- Z-Image
# nunchaku/models/transformers/transformer_zimage.py (NunchakuZImageAttention: to_qkv = [to_q, to_k, to_v], to_out.0;
# _convert_z_image_ff: diffusers FeedForward(activation_fn="swiglu"), whose SwiGLU computes value * silu(gate) with
# value first, so net.0.proj = [w3; w1] (Z-Image computes w2(silu(w1 x) * w3 x)), net.2 = w2; NunchakuZImageFeedForward
# = NunchakuSDXLFeedForward: signed; skip_refiners: noise_refiner / context_refiner keep 16-bit attention and get
# the 16-bit FeedForward, net.0.proj.weight = [w3; w1]; patch_scale_key, convert_fp16, load_state_dict strict).
_ZIMAGE_BLOCK = Block(layers=(
    _L("attention.to_qkv", W4A4, "attention.to_q", "attention.to_k", "attention.to_v"),
    _L("attention.to_out.0", W4A4, "attention.to_out.0"),
    _L("feed_forward.net.0.proj", W4A4, "feed_forward.w3", "feed_forward.w1"),
    _L("feed_forward.net.2", W4A4, "feed_forward.w2"),
))
ZIMAGE_SKIPPED_REFINER = Block(layers=(
    _L("feed_forward.net.0.proj", DENSE, "feed_forward.w3", "feed_forward.w1"),
    _L("feed_forward.net.2", DENSE, "feed_forward.w2"),
))

# ---------------------------------------------------------------------------------------------- SDXL UNet
# nunchaku/models/unets/unet_sdxl.py (NunchakuSDXLAttention: attn1 (self) -> to_qkv = [to_q, to_k, to_v]; attn2
# (cross) -> to_q W4A4, to_k / to_v stay nn.Linear; to_out[0] W4A4; NunchakuSDXLFeedForward: every nn.Linear of ff.net
# (GEGLU net.0.proj, net.2), signed; only the transformer blocks of CrossAttn down/up blocks and the mid block;
# from_pretrained: convert_sdxl_state_dict (suffix renames only), no patch_scale_key, load_state_dict strict).
_SDXL_BLOCK = Block(layers=(
    _L("attn1.to_qkv", W4A4, "attn1.to_q", "attn1.to_k", "attn1.to_v"),
    _L("attn1.to_out.0", W4A4, "attn1.to_out.0"),
    _L("attn2.to_q", W4A4, "attn2.to_q"),
    _L("attn2.to_out.0", W4A4, "attn2.to_out.0"),
    _L("ff.net.0.proj", W4A4, "ff.net.0.proj"),
    _L("ff.net.2", W4A4, "ff.net.2"),
))

_PY = "config", "quantization_config"   # Python loaders: json config (required) and quantization_config["rank"]
MODELS = {s.model_class: s for s in (
    ModelSpec("NunchakuFluxTransformer2dModel", "FluxTransformer2DModel", LEGACY,
              {"transformer_blocks": _FLUX_DOUBLE_LEGACY, "single_transformer_blocks": _FLUX_SINGLE_LEGACY},
              ("config", "quantization_config", "comfy_config"), pads=True, strict=False,
              source="nunchaku/models/transformers/transformer_flux.py, src/FluxModel.cpp"),
    ModelSpec("NunchakuFluxTransformer2DModelV2", "FluxTransformer2DModel", DIFFUSERS,
              {"transformer_blocks": _FLUX_DOUBLE_V2, "single_transformer_blocks": _FLUX_SINGLE_V2},
              _PY, pads=False, strict=True, source="nunchaku/models/transformers/transformer_flux_v2.py"),
    ModelSpec("NunchakuSanaTransformer2DModel", "SanaTransformer2DModel", LEGACY, {"transformer_blocks": _SANA_BLOCK},
              ("config",), pads=True, strict=False,
              source="nunchaku/models/transformers/transformer_sana.py, src/SanaModel.cpp"),
    ModelSpec("NunchakuQwenImageTransformer2DModel", "QwenImageTransformer2DModel", DIFFUSERS,
              {"transformer_blocks": _QWEN_BLOCK}, _PY, pads=False, strict=True,
              source="nunchaku/models/transformers/transformer_qwenimage.py"),
    ModelSpec("NunchakuZImageTransformer2DModel", "ZImageTransformer2DModel", DIFFUSERS,
              {"layers": _ZIMAGE_BLOCK, "noise_refiner": _ZIMAGE_BLOCK, "context_refiner": _ZIMAGE_BLOCK},
              _PY, pads=False, strict=True, source="nunchaku/models/transformers/transformer_zimage.py"),
    ModelSpec("NunchakuSDXLUNet2DConditionModel", "UNet2DConditionModel", DIFFUSERS,
              {"transformer_blocks": _SDXL_BLOCK}, _PY, pads=False, strict=True,
              source="nunchaku/models/unets/unet_sdxl.py"),
)}


def model_spec(model_class: str) -> ModelSpec:
    if model_class not in MODELS:
        raise SpecError(f"model_class {model_class!r} is not one of Nunchaku's loaders: {', '.join(sorted(MODELS))}")
    return MODELS[model_class]


# ---------------------------------------------------------------------------------------------- tensors per layer
# The suffixes are written in the legacy (C++) spelling; the diffusers convention renames the W4A4 ones as
# convert_flux_state_dict / convert_sdxl_state_dict do in reverse (transformer_flux_v2.py, unet_sdxl.py).
SUFFIX_RENAMES = {LEGACY: {}, DIFFUSERS: {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig",
                                           "lora_down": "proj_down", "lora_up": "proj_up"}}

# W4A4: src/Linear.cpp GEMM_W4A4 (qweight int8 [N', K'/2], wscales [K'/64, N'] or fp8 [K'/16, N'], bias [N'], smooth
# [K'], lora_down [K', R], lora_up [N', R]: Optional, wtscale: Optional, numel 1, fp32/bf16/fp16, wcscales: Optional,
# [N'] in the model dtype), nunchaku/models/linear.py SVDQW4A4Linear (the same shapes unpadded, plus
# smooth_factor_orig [K]; wcscales only for nvfp4, wtscale a float attribute) and models/transformers/utils.py
# patch_scale_key (fills a missing wcscales with ones, pops {name}.wtscale). Need per loader family
# (legacy C++, Python FluxV2 / Qwen-Image / Z-Image, Python SDXL which calls no patch_scale_key):
# required | bias (iff the layer has one) | optional (read if present) | inert (never read: C++ registers no
# smooth_orig, and no Python code reads smooth_factor_orig) | absent (a strict load rejects it). An emitter
# of the legacy FLUX names should write smooth_orig and lora_* anyway: the V2 loader reads legacy files through
# convert_flux_state_dict and then requires them. DeepCompressor's smooth_orig is the packed, padded smooth.
_FAMILY = {LEGACY: 0, DIFFUSERS: 1, "sdxl": 2}
_W4A4_TENSORS = (
    # suffix,      shape,          dtype,            precision, (legacy,     python,     sdxl)
    ("qweight",     ("N", "K/2"),  "int8",           None,      ("required", "required", "required")),
    ("wscales",     ("K/64", "N"), "model",          "int4",    ("required", "required", "required")),
    ("wscales",     ("K/16", "N"), "float8_e4m3fn",  "nvfp4",   ("required", "required", "required")),
    ("bias",        ("N",),        "model",          None,      ("bias", "bias", "bias")),
    ("smooth",      ("K",),        "model",          None,      ("required", "required", "required")),
    ("smooth_orig", ("K",),        "model",          None,      ("inert", "required", "required")),
    ("lora_down",   ("K", "R"),    "model",          None,      ("optional", "required", "required")),
    ("lora_up",     ("N", "R"),    "model",          None,      ("optional", "required", "required")),
    ("wcscales",    ("N",),        "model",          "nvfp4",   ("optional", "optional", "required")),
    ("wtscale",     ("1",),        "scalar",         "nvfp4",   ("optional", "optional", "absent")),
)
# AWQ W4A16: src/Linear.cpp GEMV_AWQ (qweight int32 [N/4, ceil(K/8)*4], wscales / wzeros [ceil(K/64), N], bias [N],
# lora_down / lora_up Optional and not written here), linear.py AWQW4A16Linear (the same, group 64). Never padded.
_AWQ_TENSORS = (
    ("qweight", ("N/4", "K/2"), "int32", None, ("required",) * 3),
    ("wscales", ("K/64", "N"), "model", None, ("required",) * 3),
    ("wzeros", ("K/64", "N"), "model", None, ("required",) * 3),
    ("bias", ("N",), "model", None, ("bias",) * 3),
)
# 16-bit fused linears (SANA cross_attn.kv_linear: GEMM_F16 weight [N, K], bias; Z-Image skipped refiners' FF) and
# SANA's depthwise conv (src/Linear.cpp DWCONV: weight [N, 3, 3, 1], bias [N]).
_DENSE_TENSORS = (("weight", ("N", "K"), "model", None, ("required",) * 3),
                  ("bias", ("N",), "model", None, ("bias",) * 3))
_DWCONV_TENSORS = (("weight", ("N", "3", "3", "1"), "model", None, ("required",) * 3),
                   ("bias", ("N",), "model", None, ("bias",) * 3))
_TENSORS = {W4A4: _W4A4_TENSORS, AWQ: _AWQ_TENSORS, DENSE: _DENSE_TENSORS, DWCONV: _DWCONV_TENSORS}


@dataclass(frozen=True)
class Expect:
    """One expected tensor: shape, dtype (None: any float of one element, the NVFP4 wtscale) and need."""
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    need: str


def _pad(x: int, m: int) -> int:
    return -(-x // m) * m


def stored_dims(spec: ModelSpec, kind: str, n: int, k: int, rank: int, where: str) -> tuple[int, int, int]:
    """(N, K, R) as stored: the C++ engine pads a W4A4 layer's N and K to 128 and the rank to 16 (Linear.cpp); the
    Python SVDQW4A4Linear takes them as they are, so there they must already be multiples of 128 (the GEMM asserts
    N % 128 and reads K in steps of 128); AWQ W4A16 is never padded and needs N % 8 and K % 64 (gemv_awq)."""
    if kind == W4A4:
        if spec.pads:
            return _pad(n, 128), _pad(k, 128), _pad(rank, 16)
        if n % 128 or k % 128 or rank % 16:
            raise SpecError(f"{where}: {spec.model_class} takes W4A4 layers unpadded, so N = {n} and K = {k} must be "
                            f"multiples of 128 and the rank {rank} of 16")
        return n, k, rank
    if kind == AWQ and (n % 8 or k % AWQ_GROUP_SIZE):
        raise SpecError(f"{where}: AWQ W4A16 needs N % 8 == 0 and K % 64 == 0, got N = {n}, K = {k}")
    return n, k, rank


def _resolve(shape: tuple[str, ...], n: int, k: int, r: int) -> tuple[int, ...]:
    val = {"N": n, "K": k, "R": r, "N/4": n // 4, "K/2": k // 2, "K/64": k // 64, "K/16": k // 16}
    return tuple(val[s] if s in val else int(s) for s in shape)


def layer_tensors(spec: ModelSpec, layer: Layer, prefix: str, n: int, k: int, has_bias: bool, precision: str,
                  dtype: torch.dtype, rank: int) -> dict[str, Expect]:
    """The keys (prefix.suffix, in the class's convention) Nunchaku reads for one stored layer of logical shape
    [n, k] (after fusion, before the engine's padding)."""
    if precision not in PRECISIONS:
        raise SpecError(f"{prefix}: precision {precision!r} is not one of {PRECISIONS}")
    family = _FAMILY["sdxl" if spec.model_class == "NunchakuSDXLUNet2DConditionModel" else spec.convention]
    sn, sk, sr = stored_dims(spec, layer.kind, n, k, rank, prefix)
    renames = SUFFIX_RENAMES[spec.convention] if layer.kind == W4A4 else {}
    out = {}
    for suffix, shape, dt, prec, needs in _TENSORS[layer.kind]:
        need = needs[family]
        if (prec is not None and prec != precision) or (need == "bias" and not has_bias):
            continue
        if layer.kind == W4A4 and suffix.startswith("lora_") and sr == 0 and need == "optional":
            continue   # rank 0: the FLUX loader synthesises empty branches (transformer_flux.py from_pretrained)
        torch_dt = None if dt == "scalar" else (dtype if dt == "model" else getattr(torch, dt))
        out[f"{prefix}.{renames.get(suffix, suffix)}"] = Expect(_resolve(shape, sn, sk, sr), torch_dt,
                                                                 "required" if need == "bias" else need)
    return out


def check(tensors: dict, expected: dict[str, Expect], strict: bool) -> list[str]:
    """Every problem a Nunchaku loader would have with `tensors`, one line each naming the key: a required key
    missing, a present key of the wrong shape or dtype, an `absent` key present, and (strict loaders only) a key it
    does not know."""
    problems = []
    for key, exp in sorted(expected.items()):
        t = tensors.get(key)
        if t is None:
            if exp.need == "required":
                problems.append(f"{key}: missing (required, shape {list(exp.shape)}, {exp.dtype})")
            continue
        if exp.need == "absent":
            problems.append(f"{key}: present, but this loader rejects it")
        elif exp.dtype is None:
            if t.numel() != 1 or not t.dtype.is_floating_point:
                problems.append(f"{key}: must be one float element, got {t.dtype} of shape {list(t.shape)}")
        elif tuple(t.shape) != exp.shape or t.dtype != exp.dtype:
            problems.append(f"{key}: expected {exp.dtype} of shape {list(exp.shape)}, got {t.dtype} of shape "
                            f"{list(t.shape)}")
    if strict:
        problems += [f"{key}: unexpected (the strict load_state_dict rejects it)"
                     for key in sorted(set(tensors) - set(expected))]
    return problems
