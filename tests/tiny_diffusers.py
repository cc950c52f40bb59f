"""Tiny random-initialised diffusers models saved as folders (diffusers' own from_config + save_pretrained, seeded),
and random calibration inputs of the shapes their forward takes, written as dcc calibration files. Hidden sizes
are multiples of 64 so that W4A4's groups of 64 fit (shared by tests/models/test_diffusers*.py and
tests/cli/test_cli_diffusers.py; tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import torch

# class name -> the config of a tiny model of it (two or three blocks per list, 128 wide, heads of 64)
CONFIGS = {
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24)),
    "SanaTransformer2DModel": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1),
    "QwenImageTransformer2DModel": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(16, 24, 24)),
    # the FFN's hidden width is int(dim / 3 * 8) = 341 at dim 128: its w2 takes no 64-group (--unsupported keep)
    "ZImageTransformer2DModel": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[16, 24, 24], axes_lens=[64, 32, 32]),
    "UNet2DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 64, norm_num_groups=32),
}


def build(cls_name: str, seed: int = 0, **overrides):
    """A random model of the class: diffusers' from_config, seeded, in eval mode."""
    import diffusers
    torch.manual_seed(seed)
    cls = getattr(diffusers, cls_name)
    model = cls.from_config({**CONFIGS[cls_name], **overrides}).eval()
    with torch.no_grad():   # zero-initialised gates and outputs (adaLN-zero) would make blocks identities
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() >= 1 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def save(folder, cls_name: str, seed: int = 0, max_shard_size=None, **overrides):
    """Write a tiny model folder (config.json with _class_name + diffusion_pytorch_model*.safetensors)."""
    model = build(cls_name, seed, **overrides)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return model, folder


def random_inputs(cls_name: str, samples: int = 2, seed: int = 0) -> tuple[dict, dict]:
    """(forward kwargs of `samples` random samples, layout): layout names how dcc's calibration file stores each
    kwarg ("batch": [N, ...]; "list": one tensor per sample, which the forward takes as a list; "shared": the same
    for every sample, no sample dimension; "values": per-sample JSON values)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    t = torch.rand(samples, generator=g)
    n = samples
    if cls_name == "FluxTransformer2DModel":
        h = w = 4
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"),
                              -1).reshape(-1, 3).float()
        kw = {"hidden_states": r(n, h * w, 16), "encoder_hidden_states": r(n, 8, 64), "pooled_projections": r(n, 64),
              "timestep": t, "img_ids": img_ids, "txt_ids": torch.zeros(8, 3), "guidance": torch.full((n,), 3.5)}
        return kw, {"img_ids": "shared", "txt_ids": "shared"}
    if cls_name == "SanaTransformer2DModel":
        return {"hidden_states": r(n, 8, 4, 4), "encoder_hidden_states": r(n, 8, 64), "timestep": t * 1000}, {}
    if cls_name == "QwenImageTransformer2DModel":
        return ({"hidden_states": r(n, 16, 64), "encoder_hidden_states": r(n, 8, 64),
                 "encoder_hidden_states_mask": torch.ones(n, 8), "timestep": t,
                 "img_shapes": [[[1, 4, 4]]] * n}, {"img_shapes": "values"})
    if cls_name == "ZImageTransformer2DModel":
        return {"x": r(n, 16, 1, 8, 8), "t": t, "cap_feats": r(n, 32, 64)}, {"x": "list", "cap_feats": "list"}
    if cls_name == "UNet2DConditionModel":
        return ({"sample": r(n, 4, 8, 8), "timestep": t * 1000, "encoder_hidden_states": r(n, 8, 64),
                 "added_cond_kwargs": {"text_embeds": r(n, 64), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * n)}},
                {})
    raise ValueError(cls_name)


def write_calib(path, cls_name: str, samples: int = 2, seed: int = 0):
    """A dcc calibration file of random inputs of the class's forward."""
    from dcc.models.diffusers_calib import CalibInputs
    kw, layout = random_inputs(cls_name, samples, seed)
    CalibInputs.from_kwargs(cls_name, kw, layout, samples).save(path)
    return path


ASSETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "assets"
TOKENIZER = ASSETS / "smollm2_tokenizer"   # a real fast tokenizer (SmolLM2's BPE), on disk: no download


def save_flux_pipeline(folder, seed: int = 0):
    """A tiny FluxPipeline folder: CLIP and T5 text encoders (random, 64 wide) with SmolLM2's tokenizer in both
    tokenizer slots, a one-level AutoencoderKL, the flow-matching scheduler and the tiny FLUX transformer."""
    import transformers as T
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    torch.manual_seed(seed)
    tok = T.AutoTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)
    tok2 = T.AutoTokenizer.from_pretrained(str(TOKENIZER), model_max_length=64)
    vocab = len(tok)
    clip = T.CLIPTextModel(T.CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                            projection_dim=64, eos_token_id=tok.eos_token_id,
                                            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)).eval()
    t5 = T.T5EncoderModel(T.T5Config(vocab_size=vocab, d_model=64, d_kv=32, d_ff=64, num_layers=1,
                                     num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), latent_channels=4,
                        norm_num_groups=32, sample_size=16).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=build("FluxTransformer2DModel", seed))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@__import__("pytest").fixture(autouse=True)
def one_thread():
    """Tests on tiny models run single-threaded: on a shared, busy machine, threaded BLAS (eigh in svd_lowrank)
    oversubscribes the cores and runs a hundred times slower. Import it into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_sdxl_pipeline(folder, seed: int = 0):
    """A tiny StableDiffusionXLPipeline folder: two CLIP text encoders (32 wide, the second with a 64-wide
    projection) with SmolLM2's tokenizer, a one-level AutoencoderKL, Euler and the tiny UNet."""
    import transformers as T
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    torch.manual_seed(seed)
    tok = T.AutoTokenizer.from_pretrained(str(TOKENIZER), model_max_length=16)
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=77, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.pad_token_id)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), latent_channels=4,
                        norm_num_groups=32, sample_size=16).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=T.CLIPTextModel(T.CLIPTextConfig(**cfg)).eval(), tokenizer=tok, tokenizer_2=tok,
        text_encoder_2=T.CLIPTextModelWithProjection(T.CLIPTextConfig(**cfg, projection_dim=64)).eval(),
        unet=build("UNet2DConditionModel", seed), scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
