"""dcc/models/diffusers_folder.py and diffusers_loading.py: a diffusers folder (model, sharded, or pipeline) read
lazily through LazyModel -- diffusers' own class as a meta skeleton, the block lists found without a table, one
block's weights at a time -- and the one-line refusals (unknown class, missing shard, wrong shapes)."""
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
from dcc.models.diffusers_folder import find_block_lists, is_diffusers_folder  # noqa: E402
from dcc.models.loader import LazyModel, ModelLoadError  # noqa: E402

LISTS = {
    "FluxTransformer2DModel": ["transformer_blocks", "single_transformer_blocks"],
    "SanaTransformer2DModel": ["transformer_blocks"],
    "QwenImageTransformer2DModel": ["transformer_blocks"],
    "ZImageTransformer2DModel": ["noise_refiner", "context_refiner", "layers"],
    "UNet2DConditionModel": ["down_blocks.1.attentions.0.transformer_blocks",
                             "up_blocks.0.attentions.0.transformer_blocks",
                             "up_blocks.0.attentions.1.transformer_blocks",
                             "mid_block.attentions.0.transformer_blocks"],
}


@pytest.mark.parametrize("cls", list(LISTS))
def test_block_lists_are_the_innermost_attention_lists(cls):
    lists = find_block_lists(td.build(cls))
    assert [n for n, _ in lists] == LISTS[cls]
    # a UNet's blocks are its BasicTransformerBlocks, not the Transformer2DModels around them nor the resnets
    assert len({type(m[0]).__name__ for _, m in lists}) == (2 if cls == "FluxTransformer2DModel" else 1)


def test_lazy_model_of_a_transformer_folder(tmp_path):
    model, folder = td.save(tmp_path, "FluxTransformer2DModel")
    assert is_diffusers_folder(folder)
    lm = LazyModel(folder)
    assert lm.adapter.kind == "diffusers" and type(lm.model).__name__ == "FluxTransformer2DModel"
    assert lm.block_lists == LISTS["FluxTransformer2DModel"] and len(lm.blocks) == 4
    assert lm.block_prefix(2) == "single_transformer_blocks.0" and lm.model.get_submodule("single_transformer_blocks.0") \
        is lm.blocks[2]
    assert all(p.is_meta for p in lm.model.parameters())
    # the parts outside the blocks, then one block: exactly the saved tensors; the other blocks stay on meta
    lm.materialize("")
    assert torch.equal(lm.model.x_embedder.weight, model.x_embedder.weight)
    assert all(p.is_meta for b in lm.blocks for p in b.parameters())
    block = lm.materialize(lm.block_prefix(2))
    assert torch.equal(block.proj_out.weight, model.single_transformer_blocks[0].proj_out.weight)
    assert all(p.is_meta for p in lm.blocks[3].parameters())
    lm.release(lm.block_prefix(2))
    assert all(p.is_meta for p in lm.blocks[2].parameters())
    assert lm.config.to_dict()["_class_name"] == "FluxTransformer2DModel" and lm.in_blocks("transformer_blocks.1.x")


def test_sharded_folder_and_pipeline_folder(tmp_path):
    model, folder = td.save(tmp_path / "pipe" / "transformer", "SanaTransformer2DModel", max_shard_size="200KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    lm = LazyModel(tmp_path / "pipe")
    assert lm.path == folder and lm.pipeline_path == tmp_path / "pipe"
    block = lm.materialize(lm.block_prefix(1))
    assert torch.equal(block.attn1.to_q.weight, model.transformer_blocks[1].attn1.to_q.weight)
    # a shard the index names is gone: one line naming it, before any work
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"{shard}: missing safetensors shard"):
        LazyModel(folder)


def test_unknown_class_and_wrong_shapes_are_refused(tmp_path):
    _, folder = td.save(tmp_path, "SanaTransformer2DModel")
    cfg = json.loads((folder / "config.json").read_text())
    for name in ("NoSuchTransformer", "SanaPipeline", "DDPMScheduler"):
        (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": name}))
        with pytest.raises(ModelLoadError) as e:
            LazyModel(folder)
        assert str(e.value).startswith(f"{folder / 'config.json'}: _class_name {name} is not a model class of "
                                       f"diffusers") and "never code from the folder" in str(e.value)
    (folder / "config.json").write_text(json.dumps({**cfg, "caption_channels": 128}))
    with pytest.raises(ModelLoadError) as e:
        LazyModel(folder)
    assert str(e.value) == (f"{folder}: tensor caption_projection.linear_1.weight has shape (128, 64), the config "
                            f"expects (128, 128)")


def test_a_pipeline_without_a_denoiser_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "vae": ["diffusers",
                                                                                                    "AutoencoderKL"]}))
    with pytest.raises(ModelLoadError, match="no transformer/ or unet/ folder to compile \\(components: vae\\)"):
        LazyModel(tmp_path)
