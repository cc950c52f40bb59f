"""expected_keys.py against tiny random diffusers models: for FLUX (C++ and V2 names), SANA, Qwen-Image, Z-Image and
SDXL, build the tensors an emitter would write (layout.py / layout_awq.py packing random codes and scales, fused and
named by naming.py) and check every key, shape and dtype, nothing expected missing and (strict loaders) nothing
extra; plus hand-written key sets and shapes of one block per class, read off Nunchaku's loaders."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from dcc.targets.nunchaku import expected_keys as ek  # noqa: E402
from dcc.targets.nunchaku import layout, layout_awq, naming  # noqa: E402

RANK = 32


def _flux():
    return diffusers.FluxTransformer2DModel.from_config(dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24)))


def _sana():   # D = 160 (5 heads of 32): exercises dim_pad = 256 and H' = 448 > 400
    return diffusers.SanaTransformer2DModel.from_config(dict(
        in_channels=8, out_channels=8, num_attention_heads=5, attention_head_dim=32, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=80, cross_attention_dim=160, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1))


def _qwen():
    return diffusers.QwenImageTransformer2DModel.from_config(dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(16, 24, 24)))


def _zimage():  # dim 384: the SwiGLU hidden int(384 / 3 * 8) = 1024 is a multiple of 128
    return diffusers.ZImageTransformer2DModel.from_config(dict(
        in_channels=4, dim=384, n_layers=1, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=64,
        axes_dims=[32, 48, 48], axes_lens=[64, 32, 32]))


def _sdxl():
    return diffusers.UNet2DConditionModel.from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(64, 128), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=(2, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, use_linear_projection=True))


_BUILD = {"FluxTransformer2DModel": _flux, "SanaTransformer2DModel": _sana, "QwenImageTransformer2DModel": _qwen,
          "ZImageTransformer2DModel": _zimage, "UNet2DConditionModel": _sdxl}
_MODELS = {}


def _model(cls):
    if cls not in _MODELS:
        torch.manual_seed(0)
        _MODELS[cls] = _BUILD[cls]().eval()
    return _MODELS[cls]


def _linear_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _shape(m):
    return (m.out_features, m.in_features) if isinstance(m, torch.nn.Linear) else (m.out_channels, m.in_channels)


def _w2d(m):
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _names(cls, flux="legacy", refiners=True):
    model = _model(cls)
    paths = _linear_paths(model)
    quant = [p for p, kind in naming.nunchaku_linears(cls, paths, flux).items() if kind == ek.W4A4]
    if not refiners:
        quant = [p for p in quant if "refiner" not in p]
    return model, naming.nunchaku_names(cls, quant, paths, flux)


# ---------------------------------------------------------------------------------------------- the emitter's side

def _vec(v, spec, fill, dtype):
    v = v.to(dtype)
    return layout.pack_channel_vector(layout.pad_channel_vector(v, fill) if spec.pads else v)


def _w4a4(sl, spec, n, k, bias, precision, dtype, g):
    fp4, gs = precision == "nvfp4", ek.GROUP_SIZE[precision]
    codes = torch.randint(0, 16, (n, k), generator=g) - (0 if fp4 else 8)
    groups = -(-k // gs)
    if fp4:
        scales = (torch.rand(n, groups, generator=g) * 4 + 0.25).to(torch.float8_e4m3fn)
    else:
        scales = torch.rand(n, groups, generator=g).to(dtype)
    down = torch.randn(RANK, k, generator=g).to(dtype)
    up = torch.randn(n, RANK, generator=g).to(dtype)
    if spec.pads:
        codes, scales = layout.pad_codes(codes.to(torch.int8)), layout.pad_group_scales(scales, gs)
        down, up = layout.pad_lora_down(down), layout.pad_lora_up(up)
    smooth = _vec(torch.rand(k, generator=g) + 0.5, spec, 1.0, dtype)
    t = {"qweight": layout.pack_qweight(codes.to(torch.int8), fp4=fp4),
         "wscales": layout.pack_micro_scales(scales) if fp4 else layout.pack_wscales(scales),
         "smooth": smooth, "smooth_orig": smooth.clone(),      # DeepCompressor: smooth_orig is the packed smooth
         "lora_down": layout.pack_lora_down(down), "lora_up": layout.pack_lora_up(up)}
    if bias is not None:
        t["bias"] = _vec(bias, spec, 0.0, dtype)
    if fp4:
        t["wcscales"] = _vec(torch.rand(n, generator=g) + 0.5, spec, 1.0, dtype)
        t["wtscale"] = torch.tensor([0.5])
    return t


def _awq(n, k, bias, dtype, g):
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // 64, generator=g).to(dtype)
    wscales, wzeros = layout_awq.pack_scales(scale, torch.full_like(scale, 7), dtype=dtype)
    return {"qweight": layout_awq.pack_qweight(codes), "wscales": wscales, "wzeros": wzeros, "bias": bias.to(dtype)}


def emit(model, names, precision="int4", dtype=torch.bfloat16):
    """The tensor dict an emitter writes (random codes and scales; real 16-bit weights), and the expected keys."""
    spec = ek.model_spec(names.model_class)
    g = torch.Generator().manual_seed(1)
    out, expected = {}, {}
    for sl in names.layers:
        mods = [model.get_submodule(p) for p in sl.parts]
        n, k = naming.stored_shape(sl, {p: _shape(m) for p, m in zip(sl.parts, mods)})
        bias = naming.stored_bias(sl, [m.bias.detach() if m.bias is not None else None for m in mods], n)
        if sl.kind == ek.DWCONV:
            t = {"weight": naming.stored_rows(sl, [mods[0].weight.detach()]).permute(0, 2, 3, 1).to(dtype)}
        else:
            w = naming.stored_cols(sl, naming.stored_rows(sl, [_w2d(m) for m in mods]))
            assert tuple(w.shape) == (n, k), sl.prefix   # stored_shape agrees with the arranged weight
            if sl.kind == ek.W4A4:
                t = _w4a4(sl, spec, n, k, bias, precision, dtype, g)
            elif sl.kind == ek.AWQ:
                t = _awq(n, k, bias, dtype, g)
            else:
                t = {"weight": w.to(dtype)}
        if bias is not None and "bias" not in t:
            t["bias"] = bias.to(dtype)
        exp = ek.layer_tensors(spec, sl.layer, sl.prefix, n, k, bias is not None, precision, dtype, RANK)
        expected.update(exp)
        for suffix, tensor in t.items():
            key = f"{sl.prefix}.{names.suffix(suffix)}"
            if key in exp and exp[key].need != "absent":
                out[key] = tensor
    for name, p in model.state_dict().items():
        stored = names.stored_param(name)
        if stored is not None:
            out[stored] = p.to(dtype)
            expected[stored] = ek.Expect(tuple(p.shape), dtype, "required")
    return out, expected, spec


_EMITTED = {}


def emitted(cls, flux="legacy", precision="int4", dtype=torch.bfloat16, refiners=True):
    """emit() of a class, computed once per session (packing dominates the time); a fresh dict to edit each call."""
    key = (cls, flux, precision, dtype, refiners)
    if key not in _EMITTED:
        model, names = _names(cls, flux, refiners)
        _EMITTED[key] = (model, names) + emit(model, names, precision, dtype)
    model, names, tensors, expected, spec = _EMITTED[key]
    return model, names, dict(tensors), expected, spec


_INT4_ONLY = ("QwenImageTransformer2DModel", "ZImageTransformer2DModel")
CASES = [("FluxTransformer2DModel", "legacy"), ("FluxTransformer2DModel", "v2"), ("SanaTransformer2DModel", None),
         ("QwenImageTransformer2DModel", None), ("ZImageTransformer2DModel", None), ("UNet2DConditionModel", None)]


# NVFP4 for one class of each loader family (C++, Python, SDXL) and SANA's padded micro-scales: the others share
# their tensor tables, and packing dominates the time
@pytest.mark.parametrize("cls,flux,precision", [c + ("int4",) for c in CASES] + [c + ("nvfp4",) for c in CASES
                                                                                 if c[0] not in _INT4_ONLY])
def test_emitted_tensors_match_the_spec(cls, flux, precision):
    _, _, tensors, expected, spec = emitted(cls, flux or "legacy", precision)
    assert ek.check(tensors, expected, spec.strict) == []
    required = {k for k, e in expected.items() if e.need == "required"}
    assert required <= set(tensors)
    assert not any(e.need == "absent" for k, e in expected.items() if k in tensors)


def test_fp16_checkpoint_and_a_wrong_dtype_is_named():
    _, _, tensors, expected, spec = emitted("QwenImageTransformer2DModel", dtype=torch.float16)
    assert ek.check(tensors, expected, True) == []
    key = "transformer_blocks.0.attn.to_qkv.wscales"
    tensors[key] = tensors[key].to(torch.bfloat16)
    assert ek.check(tensors, expected, True) == [f"{key}: expected torch.float16 of shape [2, 384], got "
                                                 f"torch.bfloat16 of shape [2, 384]"]


def test_check_names_missing_unexpected_and_absent_keys():
    _, _, tensors, expected, spec = emitted("UNet2DConditionModel", precision="nvfp4")
    prefix = "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
    del tensors[f"{prefix}.wcscales"]                      # SDXL has no patch_scale_key: wcscales is required
    tensors[f"{prefix}.wtscale"] = torch.tensor([1.0])     # ... and a wtscale is an unexpected key
    tensors["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(1)
    problems = ek.check(tensors, expected, spec.strict)
    assert problems == [f"{prefix}.wcscales: missing (required, shape [128], torch.bfloat16)",
                        f"{prefix}.wtscale: present, but this loader rejects it",
                        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight: unexpected (the strict "
                        "load_state_dict rejects it)"]


def test_python_classes_need_multiples_of_128():
    spec = ek.model_spec("NunchakuQwenImageTransformer2DModel")
    layer = spec.blocks["transformer_blocks"].layers[2]
    with pytest.raises(ek.SpecError, match=r"blk\.attn\.to_qkv: .* N = 480 and K = 160 must be multiples of 128"):
        ek.layer_tensors(spec, layer, "blk.attn.to_qkv", 480, 160, True, "int4", torch.bfloat16, RANK)
    with pytest.raises(ek.SpecError, match="not one of Nunchaku's loaders"):
        ek.model_spec("NunchakuPixArtTransformer2DModel")


# ---------------------------------------------------------------------------------------------- golden blocks
# Read off the loaders directly (not through the tables): SVDQW4A4Linear's parameters (linear.py), GEMM_W4A4's
# registerParams (Linear.cpp), AWQW4A16Linear / GEMV_AWQ, the block modules of each class.
_SVDQ = ("qweight", "wscales", "bias", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up")
_CPP = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
_AWQ = ("qweight", "wscales", "wzeros", "bias")


def _keys(prefix, layers, suffixes, drop=()):
    return {f"{prefix}.{layer}.{s}" for layer in layers for s in suffixes if s not in drop}


def _block(tensors, prefix):
    return {k for k in tensors if k.startswith(prefix + ".")}


def test_flux_cpp_block_keys():
    tensors = emitted("FluxTransformer2DModel")[2]
    p = "transformer_blocks.0"
    want = _keys(p, ["qkv_proj", "qkv_proj_context", "out_proj", "out_proj_context", "mlp_fc1", "mlp_fc2",
                     "mlp_context_fc1", "mlp_context_fc2"], _CPP) | _keys(p, ["norm1.linear", "norm1_context.linear"],
                                                                           _AWQ)
    want |= {f"{p}.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    assert _block(tensors, p) == want
    s = "single_transformer_blocks.0"
    assert _block(tensors, s) == (_keys(s, ["qkv_proj", "out_proj", "mlp_fc1", "mlp_fc2"], _CPP)
                                  | _keys(s, ["norm.linear"], _AWQ) | {f"{s}.norm_q.weight", f"{s}.norm_k.weight"})
    # D = 128, 4D = 512: qkv [3D, D/2] int8, wscales [D/64, 3D]; AdaNorm AWQ qweight int32 [6D/4, D/2]
    assert tensors[f"{p}.qkv_proj.qweight"].shape == (384, 64) and tensors[f"{p}.qkv_proj.qweight"].dtype == torch.int8
    assert tensors[f"{p}.qkv_proj.wscales"].shape == (2, 384)
    assert tensors[f"{p}.qkv_proj.lora_down"].shape == (128, RANK)
    assert tensors[f"{p}.norm1.linear.qweight"].shape == (192, 64)
    assert tensors[f"{p}.norm1.linear.qweight"].dtype == torch.int32
    assert tensors[f"{s}.mlp_fc2.qweight"].shape == (128, 256)   # proj_out's MLP columns [D:] = 512
    assert tensors[f"{s}.out_proj.qweight"].shape == (128, 64)   # ... and its attention columns [:D]
    assert "single_transformer_blocks.0.proj_out.weight" not in tensors and "proj_out.weight" in tensors


def test_flux_v2_block_keys():
    tensors = emitted("FluxTransformer2DModel", "v2", "nvfp4")[2]
    p, s = "transformer_blocks.0", "single_transformer_blocks.0"
    fp4 = _SVDQ + ("wcscales", "wtscale")
    want = _keys(p, ["attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                     "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"], fp4)
    want |= _keys(p, ["norm1.linear", "norm1_context.linear"], _AWQ)
    want |= {f"{p}.attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    assert _block(tensors, p) == want
    assert _block(tensors, s) == (_keys(s, ["attn.to_qkv", "attn.to_out", "mlp_fc1", "mlp_fc2"], fp4)
                                  | _keys(s, ["norm.linear"], _AWQ)
                                  | {f"{s}.attn.norm_q.weight", f"{s}.attn.norm_k.weight"})
    assert tensors[f"{p}.attn.to_qkv.wscales"].shape == (8, 384)
    assert tensors[f"{p}.attn.to_qkv.wscales"].dtype == torch.float8_e4m3fn
    assert tensors[f"{p}.attn.to_qkv.wcscales"].dtype == torch.bfloat16   # the model dtype, not fp8


def test_sana_block_keys_and_padded_sections():
    tensors = emitted("SanaTransformer2DModel")[2]
    p = "transformer_blocks.0"
    no_bias = ("bias",)
    want = (_keys(p, ["attn.qkv_proj", "attn.out_proj", "ff.point_conv"], _CPP, drop=no_bias)
            | _keys(p, ["cross_attn.q_linear", "cross_attn.out_proj", "ff.inverted_conv"], _CPP)
            | {f"{p}.cross_attn.kv_linear.weight", f"{p}.cross_attn.kv_linear.bias", f"{p}.ff.depth_conv.weight",
               f"{p}.ff.depth_conv.bias", f"{p}.scale_shift_table"})
    assert _block(tensors, p) == want
    # D = 160 -> dim_pad 256: qkv N = 3 * 256, K' = 256; out_proj K' = 256
    assert tensors[f"{p}.attn.qkv_proj.qweight"].shape == (768, 128)
    assert tensors[f"{p}.attn.out_proj.qweight"].shape == (256, 128)
    # H = 400 -> H' = 448: inverted_conv N = 896, point_conv K = 448 -> K' = 512, depthwise [896, 3, 3, 1]
    assert tensors[f"{p}.ff.inverted_conv.qweight"].shape == (896, 128)
    assert tensors[f"{p}.ff.point_conv.qweight"].shape == (256, 256)
    assert tensors[f"{p}.ff.depth_conv.weight"].shape == (896, 3, 3, 1)
    assert tensors[f"{p}.cross_attn.kv_linear.weight"].shape == (320, 160)


def test_qwen_zimage_sdxl_block_keys():
    tensors = emitted("QwenImageTransformer2DModel")[2]
    p = "transformer_blocks.0"
    lin = ["attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
           "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    assert _keys(p, lin, _SVDQ) | _keys(p, ["img_mod.1", "txt_mod.1"], _AWQ) <= _block(tensors, p)
    assert not any(".to_q." in k or ".add_q_proj." in k for k in tensors)

    tensors = emitted("ZImageTransformer2DModel")[2]
    for p in ("layers.0", "noise_refiner.0", "context_refiner.0"):   # Z-Image linears have no bias
        assert _keys(p, ["attention.to_qkv", "attention.to_out.0", "feed_forward.net.0.proj", "feed_forward.net.2"],
                     _SVDQ, drop=("bias",)) <= _block(tensors, p)
        assert not any(".w1." in k or ".w3." in k or ".to_q." in k or k.endswith(".bias") and "attention" in k
                       for k in _block(tensors, p))
    assert tensors["layers.0.feed_forward.net.0.proj.qweight"].shape == (2048, 192)   # [w3; w1] of 1024 each

    tensors = emitted("UNet2DConditionModel")[2]
    p = "mid_block.attentions.0.transformer_blocks.0"
    assert (_keys(p, ["attn1.to_qkv", "attn2.to_q"], _SVDQ, drop=("bias",))
            | _keys(p, ["attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"], _SVDQ)) <= _block(tensors, p)
    assert {f"{p}.attn2.to_k.weight", f"{p}.attn2.to_v.weight"} <= set(tensors)   # cross-attention k/v: 16-bit
    assert tensors[f"{p}.attn2.to_k.weight"].shape == (128, 64)


def test_zimage_skip_refiners():
    model, names, tensors, expected, spec = emitted("ZImageTransformer2DModel", refiners=False)
    assert names.skip_refiners is True
    assert ek.check(tensors, expected, spec.strict) == []
    p = "noise_refiner.0.feed_forward"
    w1, w3 = (model.get_submodule(f"{p}.{n}").weight.detach() for n in ("w1", "w3"))
    assert torch.equal(tensors[f"{p}.net.0.proj.weight"], torch.cat([w3, w1]).to(torch.bfloat16))
    assert "noise_refiner.0.attention.to_q.weight" in tensors
    assert "noise_refiner.0.feed_forward.w1.weight" not in tensors
