"""LazyModel on tiny saved checkpoints: blocks found without a table, one module materialised at a time and equal
to the saved tensors, released back to meta; and every unusable folder, file or tensor named in the error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcc.models.loader import LazyModel, ModelLoadError, find_blocks, resolve_model_path

from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 128


def _config(**kw):
    return decoder_config("llama", vocab=VOCAB, hidden=32, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    return path, save_tiny(path, _config())


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(name="copy"):
        dst = tmp_path / name
        shutil.copytree(saved[0], dst)
        return dst
    return make


def test_find_blocks_on_the_skeleton(saved):
    lm = LazyModel(saved[0])
    assert lm.blocks_prefix == "model.layers" and len(lm.blocks) == 2
    assert lm.block_prefix(1) == "model.layers.1"
    assert lm.model.get_submodule("model.layers.1") is lm.blocks[1]
    # nothing is read until asked: the skeleton lives on the meta device
    assert all(p.is_meta for p in lm.model.parameters())


def test_find_blocks_takes_the_longest_list_of_one_class():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2),
                                              torch.nn.Tanh()])
            self.short = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.inner = torch.nn.Module()
            self.inner.blocks = torch.nn.ModuleList([torch.nn.GELU() for _ in range(3)])

    name, mods = find_blocks(Net())
    assert name == "inner.blocks" and len(mods) == 3
    with pytest.raises(ModelLoadError, match="no repeated blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_materialize_block_equals_saved_tensors_and_release(saved):
    path, model = saved
    tensors = load_file(path / "model.safetensors")
    lm = LazyModel(path)
    block = lm.materialize("model.layers.1")
    names = [n for n, _ in block.named_parameters()]
    assert len(names) == 9
    for n, p in block.named_parameters():
        assert not p.is_meta and p.dtype == torch.float32
        assert torch.equal(p, tensors[f"model.layers.1.{n}"]), n
        assert torch.equal(p, model.get_parameter(f"model.layers.1.{n}")), n
    # only that block: the other block and the parts outside stay on meta
    assert all(p.is_meta for p in lm.blocks[0].parameters())
    assert lm.model.model.embed_tokens.weight.is_meta
    lm.release("model.layers.1")
    assert all(p.is_meta for p in block.parameters())
    again = lm.materialize("model.layers.1")
    assert all(torch.equal(p, tensors[f"model.layers.1.{n}"]) for n, p in again.named_parameters())


def test_materialize_outside_blocks_rebuilds_rope_buffers(saved):
    path, model = saved
    lm = LazyModel(path)
    lm.materialize("")
    assert torch.equal(lm.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(lm.model.lm_head.weight, model.lm_head.weight)
    assert torch.equal(lm.model.model.norm.weight, model.model.norm.weight)
    # inv_freq is not in the checkpoint (non-persistent): it is computed again, equal to a real construction's
    assert torch.equal(lm.model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert all(p.is_meta for b in lm.blocks for p in b.parameters())


def test_materialize_all_matches_the_model_outputs(saved):
    path, model = saved
    lm = LazyModel(path)
    full = lm.materialize_all()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_dtype_conversion(saved):
    lm = LazyModel(saved[0], dtype=torch.bfloat16)
    block = lm.materialize("model.layers.0")
    ref = load_file(saved[0] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert block.mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(block.mlp.up_proj.weight, ref.to(torch.bfloat16))


def test_tied_embeddings(tmp_path):
    model = save_tiny(tmp_path, _config(tie_word_embeddings=True), seed=1)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    lm = LazyModel(tmp_path)
    assert lm.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    lm.materialize("")
    assert torch.equal(lm.model.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_checkpoint_and_missing_shard(saved, tmp_path):
    path, model = saved
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    lm = LazyModel(sharded)
    for i in range(2):
        block = lm.materialize(lm.block_prefix(i))
        for n, p in block.named_parameters():
            assert torch.equal(p, model.get_parameter(f"model.layers.{i}.{n}"))
    # a shard that the index names but that is gone: the error names the file
    wm = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sharded / wm["model.layers.1.mlp.down_proj.weight"]
    victim.unlink()
    lm = LazyModel(sharded)
    with pytest.raises(ModelLoadError, match="missing safetensors shard") as e:
        lm.materialize("model.layers.1")
    assert victim.name in str(e.value)


def test_truncated_safetensors_names_the_file(copy_of):
    folder = copy_of()
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as e:
        LazyModel(folder)
    assert str(f) in str(e.value)


def test_nan_tensor_names_the_tensor(copy_of, saved):
    folder = copy_of()
    tensors = load_file(saved[0] / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    bad = tensors[key].clone()
    bad[0, 0], bad[3, 5] = float("nan"), float("inf")
    tensors[key] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    lm = LazyModel(folder)
    lm.materialize("model.layers.1")   # the other block is fine
    with pytest.raises(ModelLoadError, match="has 2 NaN/inf values") as e:
        lm.materialize("model.layers.0")
    assert key in str(e.value) and "model.safetensors" in str(e.value)


def test_missing_tensor_and_wrong_shape(copy_of, saved):
    tensors = load_file(saved[0] / "model.safetensors")
    folder = copy_of("missing")
    t = dict(tensors)
    del t["model.layers.1.self_attn.k_proj.weight"]
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.k_proj.weight missing from the checkpoint"):
        LazyModel(folder).materialize("model.layers.1")

    folder = copy_of("shape")
    t = dict(tensors)
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model.layers.0.mlp.up_proj.weight has shape \(48, 32\), the config "
                                             r"expects \(64, 32\)"):
        LazyModel(folder).materialize("model.layers.0")


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder") as e:
        LazyModel(tmp_path / "does_not_exist")
    assert "does_not_exist" in str(e.value)


def test_folder_without_config(copy_of):
    folder = copy_of()
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json") as e:
        LazyModel(folder)
    assert str(folder) in str(e.value)


def test_folder_with_only_bin_weights(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights") as e:
        LazyModel(folder)
    assert "pytorch_model.bin" in str(e.value) and "convert it to safetensors" in str(e.value)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        resolve_model_path(folder)


def test_unreadable_config_and_plain_file(copy_of, tmp_path):
    folder = copy_of()
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError) as e:
        LazyModel(folder)
    assert "config.json" in str(e.value)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a Hugging Face folder or a .gguf file"):
        LazyModel(f)
