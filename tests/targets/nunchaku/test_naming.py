"""naming.py: model classes, the stored-prefix -> diffusers-paths mapping of both conventions, suffix spellings, the
errors for paths Nunchaku cannot hold, and the stored row order (AdaNorm interleave and +1, SANA's q|k,v-per-head
and GLU interleave, the FLUX single block's column split) checked element by element."""
import pytest
import torch

from dcc.targets.nunchaku import expected_keys as ek
from dcc.targets.nunchaku import naming
from dcc.targets.nunchaku.naming import NamingError, nunchaku_names

FLUX_DOUBLE = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
               "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2"]
FLUX_SINGLE = ["norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
FLUX_ALL = ([f"transformer_blocks.{i}.{n}" for i in range(2) for n in FLUX_DOUBLE]
            + [f"single_transformer_blocks.0.{n}" for n in FLUX_SINGLE] + ["x_embedder", "proj_out", "norm_out.linear"])
FLUX_W4A4 = [p for p in FLUX_ALL if ("transformer_blocks" in p and "norm" not in p)]
ZIMAGE = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
          "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]
ZIMAGE_ALL = [f"{b}.0.{n}" for b in ("layers", "noise_refiner", "context_refiner") for n in ZIMAGE]


def _sl(names, prefix):
    return next(s for s in names.layers if s.prefix == prefix)


def test_model_classes():
    assert naming.nunchaku_model_class("FluxTransformer2DModel") == "NunchakuFluxTransformer2dModel"
    assert naming.nunchaku_model_class("FluxTransformer2DModel", "v2") == "NunchakuFluxTransformer2DModelV2"
    assert naming.nunchaku_model_class("UNet2DConditionModel") == "NunchakuSDXLUNet2DConditionModel"
    for no_loader in ("PixArtTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel", "LlamaForCausalLM"):
        assert naming.nunchaku_model_class(no_loader) is None
        assert nunchaku_names(no_loader, ["transformer_blocks.0.attn1.to_q"]) is None
        assert naming.nunchaku_linears(no_loader, ["transformer_blocks.0.attn1.to_q"]) == {}
    with pytest.raises(NamingError, match="flux='v3'"):
        naming.nunchaku_model_class("FluxTransformer2DModel", "v3")


def test_suffixes():
    assert [naming.stored_suffix(s, ek.DIFFUSERS) for s in ("smooth", "smooth_orig", "lora_down", "lora_up")] == \
        ["smooth_factor", "smooth_factor_orig", "proj_down", "proj_up"]
    assert [naming.stored_suffix(s, ek.LEGACY) for s in ("smooth_factor", "smooth_factor_orig", "proj_down")] == \
        ["smooth", "smooth_orig", "lora_down"]
    for same in ("qweight", "wscales", "bias", "wcscales", "wtscale", "wzeros"):
        assert naming.stored_suffix(same, ek.DIFFUSERS) == naming.stored_suffix(same, ek.LEGACY) == same
    with pytest.raises(NamingError, match="convention 'cpp'"):
        naming.stored_suffix("smooth", "cpp")


def test_flux_legacy_mapping():
    names = nunchaku_names("FluxTransformer2DModel", FLUX_W4A4, FLUX_ALL)
    assert names.model_class == "NunchakuFluxTransformer2dModel" and names.convention == ek.LEGACY
    m = names.mapping()
    assert m["transformer_blocks.1.qkv_proj"] == [f"transformer_blocks.1.attn.to_{x}" for x in "qkv"]
    assert m["transformer_blocks.0.qkv_proj_context"] == [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"]
    assert m["transformer_blocks.0.mlp_context_fc2"] == ["transformer_blocks.0.ff_context.net.2"]
    assert m["transformer_blocks.0.norm1_context.linear"] == ["transformer_blocks.0.norm1_context.linear"]
    assert m["single_transformer_blocks.0.out_proj"] == m["single_transformer_blocks.0.mlp_fc2"] == \
        ["single_transformer_blocks.0.proj_out"]
    assert len(m) == 2 * 10 + 5
    unsigned = sorted(s.prefix for s in names.layers if s.unsigned("int4"))
    assert unsigned == ["single_transformer_blocks.0.mlp_fc2", "transformer_blocks.0.mlp_context_fc2",
                        "transformer_blocks.0.mlp_fc2", "transformer_blocks.1.mlp_context_fc2",
                        "transformer_blocks.1.mlp_fc2"]
    assert not any(s.unsigned("nvfp4") for s in names.layers)
    assert names.stored_param("transformer_blocks.1.attn.norm_added_k.weight") == \
        "transformer_blocks.1.norm_added_k.weight"
    assert names.stored_param("transformer_blocks.1.attn.to_q.weight") is None      # inside qkv_proj
    assert names.stored_param("x_embedder.bias") == "x_embedder.bias"
    assert names.suffix("lora_down") == "lora_down"


def test_flux_v2_mapping_and_kinds():
    names = nunchaku_names("FluxTransformer2DModel", FLUX_W4A4, FLUX_ALL, flux="v2")
    m = names.mapping()
    assert m["transformer_blocks.0.attn.to_qkv"] == [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert m["transformer_blocks.0.attn.add_qkv_proj"] == [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"]
    assert set(m) >= {"single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.0.mlp_fc1",
                      "transformer_blocks.0.ff_context.net.2"}
    assert names.suffix("smooth_orig") == "smooth_factor_orig"
    assert names.stored_param("transformer_blocks.0.attn.norm_q.weight") == "transformer_blocks.0.attn.norm_q.weight"
    kinds = naming.nunchaku_linears("FluxTransformer2DModel", FLUX_ALL)
    assert kinds["transformer_blocks.0.norm1.linear"] == ek.AWQ and kinds["transformer_blocks.0.attn.to_q"] == ek.W4A4
    assert "norm_out.linear" not in kinds and "x_embedder" not in kinds and len(kinds) == 2 * 14 + 6


def test_sdxl_paths_and_sixteen_bit_cross_attention():
    block = "up_blocks.0.attentions.1.transformer_blocks.0"
    parts = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
             "ff.net.0.proj", "ff.net.2"]
    names = nunchaku_names("UNet2DConditionModel", [f"{block}.{p}" for p in parts])
    assert names.mapping()[f"{block}.attn1.to_qkv"] == [f"{block}.attn1.to_{x}" for x in "qkv"]
    assert names.mapping()[f"{block}.attn2.to_q"] == [f"{block}.attn2.to_q"]
    assert not any(s.layer.unsigned for s in names.layers)                      # SDXL's ff.net.2 is signed
    with pytest.raises(NamingError, match=rf"^{block}\.attn2\.to_k: NunchakuSDXLUNet2DConditionModel keeps this module "
                                          "in 16 bits"):
        nunchaku_names("UNet2DConditionModel", [f"{block}.{p}" for p in parts + ["attn2.to_k"]])
    with pytest.raises(NamingError, match=r"^down_blocks\.1\.attentions\.0\.proj_in: .* outside"):
        nunchaku_names("UNet2DConditionModel", ["down_blocks.1.attentions.0.proj_in"])


def test_partial_fusion_and_missing_blocks_are_errors():
    with pytest.raises(NamingError, match=r"^transformer_blocks\.0\.qkv_proj: .* stores attn\.to_q\+attn\.to_k\+attn"
                                          r"\.to_v as one W4A4 layer; transformer_blocks\.0\.attn\.to_v is not"):
        nunchaku_names("FluxTransformer2DModel", [p for p in FLUX_W4A4 if p != "transformer_blocks.0.attn.to_v"])
    with pytest.raises(NamingError, match=r"^transformer_blocks\.1\.qkv_proj: .*transformer_blocks\.1\.attn\.to_q, "
                                          r"transformer_blocks\.1\.attn\.to_k, transformer_blocks\.1\.attn\.to_v are"):
        nunchaku_names("FluxTransformer2DModel", [p for p in FLUX_W4A4 if "transformer_blocks.1" not in p], FLUX_ALL)
    with pytest.raises(NamingError, match="proj_out: .* outside"):
        nunchaku_names("FluxTransformer2DModel", FLUX_W4A4 + ["proj_out"])


def test_zimage_fusion_order_and_refiners():
    w4a4 = [p for p in ZIMAGE_ALL if "adaLN" not in p]
    names = nunchaku_names("ZImageTransformer2DModel", w4a4, ZIMAGE_ALL)
    assert names.skip_refiners is False
    assert names.mapping()["layers.0.feed_forward.net.0.proj"] == \
        ["layers.0.feed_forward.w3", "layers.0.feed_forward.w1"]
    assert names.mapping()["context_refiner.0.feed_forward.net.2"] == ["context_refiner.0.feed_forward.w2"]
    with pytest.raises(NamingError, match="adaLN_modulation.0: .* keeps this module in 16 bits"):
        nunchaku_names("ZImageTransformer2DModel", ZIMAGE_ALL)
    skipped = nunchaku_names("ZImageTransformer2DModel", [p for p in w4a4 if "refiner" not in p], ZIMAGE_ALL)
    assert skipped.skip_refiners is True
    ff = _sl(skipped, "noise_refiner.0.feed_forward.net.0.proj")
    assert ff.kind == ek.DENSE and ff.parts == ("noise_refiner.0.feed_forward.w3", "noise_refiner.0.feed_forward.w1")
    assert skipped.stored_param("noise_refiner.0.attention.to_q.weight") == "noise_refiner.0.attention.to_q.weight"
    with pytest.raises(NamingError, match="every noise_refiner / context_refiner block is quantized or none"):
        nunchaku_names("ZImageTransformer2DModel", [p for p in w4a4 if "context_refiner" not in p], ZIMAGE_ALL)


# ---------------------------------------------------------------------------------------------- stored row order

def _sana():
    quant = [f"transformer_blocks.0.{p}" for p in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                   "attn2.to_q", "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point")]
    return nunchaku_names("SanaTransformer2DModel", quant)


def test_adanorm_rows_and_folded_one():
    names = nunchaku_names("FluxTransformer2DModel", FLUX_W4A4, FLUX_ALL)
    for prefix, s in (("transformer_blocks.0.norm1.linear", 6), ("single_transformer_blocks.0.norm.linear", 3)):
        sl = _sl(names, prefix)
        d = 4
        w = torch.arange(s * d, dtype=torch.float32)[:, None].repeat(1, 2)     # row r holds r
        out = naming.stored_rows(sl, [w])
        for dd in range(d):
            for j in range(s):
                assert out[dd * s + j, 0] == j * d + dd                           # row d*S + j <- diffusers j*D + d
        bias = naming.stored_bias(sl, [torch.zeros(s * d)], s * d).view(d, s)
        scale_rows = {1, 4} if s == 6 else {1}                                    # scale_msa (, scale_mlp)
        assert bias.eq(torch.tensor([1.0 if j in scale_rows else 0.0 for j in range(s)])).all()
    assert naming.stored_shape(sl, {sl.parts[0]: (12, 64)}) == (12, 64)


def test_flux_single_proj_out_split():
    names = nunchaku_names("FluxTransformer2DModel", FLUX_W4A4, FLUX_ALL)
    attn, mlp = _sl(names, "single_transformer_blocks.0.out_proj"), _sl(names, "single_transformer_blocks.0.mlp_fc2")
    shapes = {"single_transformer_blocks.0.proj_out": (8, 40)}
    assert naming.stored_shape(attn, shapes) == (8, 8) and naming.stored_shape(mlp, shapes) == (8, 32)
    w = torch.arange(8 * 40, dtype=torch.float32).view(8, 40)
    assert torch.equal(naming.stored_cols(attn, naming.stored_rows(attn, [w])), w[:, :8])
    assert torch.equal(naming.stored_cols(mlp, naming.stored_rows(mlp, [w])), w[:, 8:])
    b = torch.arange(8.0)
    assert torch.equal(naming.stored_bias(attn, [b], 8), torch.zeros(8))         # the bias lives in mlp_fc2
    assert torch.equal(naming.stored_bias(mlp, [b], 8), b)


def test_sana_qkv_rows_per_head():
    sl = _sl(_sana(), "transformer_blocks.0.attn.qkv_proj")
    d = 160                                                                       # 5 heads of 32, dim_pad 256
    q, k, v = (torch.full((d, 3), float(c)) + torch.arange(d)[:, None] / 1000 for c in (1, 2, 3))
    assert naming.stored_shape(sl, {p: (d, 7) for p in sl.parts}) == (768, 7)
    out = naming.stored_rows(sl, [q, k, v])
    assert out.shape == (768, 3)
    assert torch.equal(out[:d], q) and not out[d:256].any()
    for h in range(8):                                                            # 8 padded heads of 32 in 256
        for j in range(32):
            row_k, row_v = 256 + 64 * h + j, 256 + 64 * h + 32 + j
            if h < 5:
                assert torch.equal(out[row_k], k[32 * h + j]) and torch.equal(out[row_v], v[32 * h + j])
            else:
                assert not out[row_k].any() and not out[row_v].any()
    assert naming.stored_bias(sl, [torch.ones(d)] * 3, 768) is None              # qkv_proj has no bias
    assert _sana().dropped({"transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_out.0"}) == \
        ["transformer_blocks.0.attn1.to_out.0.bias"]


def test_sana_glu_rows_interleaved_and_padded():
    names = _sana()
    for prefix in ("transformer_blocks.0.ff.inverted_conv", "transformer_blocks.0.ff.depth_conv"):
        sl = _sl(names, prefix)
        hd = 400                                                                  # H' = 448
        w = torch.arange(2 * hd, dtype=torch.float32)[:, None, None, None].expand(2 * hd, 1, 3, 3)
        out = naming.stored_rows(sl, [w])
        assert out.shape == (896, 1, 3, 3)
        assert naming.stored_shape(sl, {sl.parts[0]: (800, 160)}) == (896, 160)
        for c in (0, 1, 399):
            assert out[2 * c, 0, 0, 0] == c and out[2 * c + 1, 0, 0, 0] == hd + c    # value, gate
        assert not out[800:].any()
        bias = naming.stored_bias(sl, [torch.arange(2.0 * hd)], 896)
        assert bias[1] == hd and bias[2] == 1 and not bias[800:].any()


def test_mixed_bias_parts_are_an_error():
    names = nunchaku_names("FluxTransformer2DModel", FLUX_W4A4, FLUX_ALL, flux="v2")
    sl = _sl(names, "transformer_blocks.0.attn.to_qkv")
    with pytest.raises(NamingError, match=r"transformer_blocks\.0\.attn\.to_qkv: fused parts .* mix biased"):
        naming.stored_bias(sl, [torch.zeros(4), None, torch.zeros(4)], 12)
    assert naming.stored_bias(sl, [None, None, None], 12) is None
