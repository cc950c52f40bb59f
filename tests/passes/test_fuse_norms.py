"""fuse_norms: Before/After on tiny saved Llama, Gemma (gain offset 1, tied head) and OPT (LayerNorm with bias) models
compiled block by block; the rebuilt model must compute the same logits. Also holds the helpers that
test_smooth.py and test_rotate.py import (tiny models, compile-and-rebuild)."""
import pytest
import torch
import transformers as T
from torch import nn

from dcc.compiler.pass_manager import Step
from dcc.compiler.sequential import compile_blocks
from dcc.models.loader import LazyModel
from dcc.passes._model_parts import find_final_norm, norm_offset
from dcc.passes.base import get_pass
from dcc.passes.fuse_norms import FuseNorms, FuseNormsConfig

VOCAB = 100


def tiny_config(arch: str, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, initializer_range=0.1)
    if arch == "llama":
        return T.LlamaConfig(**{**common, "num_key_value_heads": 2, "intermediate_size": 128, **kw})
    if arch == "gemma":
        return T.GemmaConfig(**{**common, "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, **kw})
    if arch == "opt":
        return T.OPTConfig(**{**common, "ffn_dim": 128, "word_embed_proj_dim": common["hidden_size"], **kw})
    raise ValueError(arch)


@torch.no_grad()
def tiny_model(arch: str, seed: int = 0, **kw) -> nn.Module:
    """A random model whose norms have non-trivial gains (and biases), so that folding them matters."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            w.copy_(torch.rand_like(w) + 0.5)
            b = getattr(mod, "bias", None)
            if isinstance(b, nn.Parameter):
                b.normal_(0, 0.3)
    return model


def saved_model(tmp_path, arch: str, seed: int = 0, **kw):
    """(original model, folder it was saved to)."""
    model = tiny_model(arch, seed, **kw)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def lazy(path) -> LazyModel:
    lm = LazyModel(path)
    # Work-around (loader bug, see the report): Gemma's embedding holds a non-persistent `embed_scale` buffer that
    # LazyModel.materialize cannot rebuild (the embedding's __init__ takes no `config`); set it the way the class does.
    for mod in lm.model.modules():
        b = mod._buffers.get("embed_scale")
        if b is not None and b.is_meta and hasattr(mod, "scalar_embed_scale"):
            mod._buffers["embed_scale"] = torch.tensor(mod.scalar_embed_scale)
    return lm


def calib_ids(seed: int = 1):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def compile_model(path, steps):
    """Run the passes through the sequential compiler; returns (lm, {block index: state_dict after the passes},
    {block index: the Block}) -- blocks are released to meta after on_block, so their tensors are cloned there."""
    lm = lazy(path)
    states, blocks = {}, {}

    def on_block(block, *_):
        states[block.index] = {k: v.detach().clone() for k, v in block.module.state_dict().items()}
        blocks[block.index] = block

    compile_blocks(lm, steps, calib_ids(), assign_specs=lambda b: None, on_block=on_block, progress=False)
    return lm, states, blocks


def rebuild(lm, states) -> nn.Module:
    """A fresh float model holding lm's non-block tensors and the compiled blocks' tensors."""
    fresh = T.AutoModelForCausalLM.from_config(lm.config).eval()
    inside = lm.blocks_prefix + "."
    sd = {k: v for k, v in lm.model.state_dict().items() if not k.startswith(inside)}
    for i, st in states.items():
        sd.update({f"{inside}{i}.{k}": v for k, v in st.items()})
    have = fresh.state_dict()
    for k, v in sd.items():   # parameters a pass created (a bias where the architecture has none)
        if k not in have:
            mod, _, attr = k.rpartition(".")
            setattr(fresh.get_submodule(mod), attr, nn.Parameter(torch.zeros_like(v)))
    fresh.load_state_dict(sd, strict=True)
    return fresh


@torch.no_grad()
def logits(model, ids=None):
    ids = calib_ids(7) if ids is None else ids
    return model(input_ids=ids, use_cache=False).logits


def assert_same_logits(a, b, tol=1e-4):
    scale = float(a.abs().max())
    err = float((a - b).abs().max())
    assert scale > 0.1, f"logit scale {scale} too small for a meaningful comparison"
    assert err < tol * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


def run_and_rebuild(path, steps):
    lm, states, blocks = compile_model(path, steps)
    return lm, rebuild(lm, states), states, blocks


# ---------------------------------------------------------------------------------------------------------------------

def test_registered_and_config_round_trip():
    assert get_pass("fuse_norms") is FuseNorms and "norms_fused" in FuseNorms.ensures
    assert FuseNormsConfig.from_dict(FuseNormsConfig(verify=False).to_dict()) == FuseNormsConfig(verify=False)
    with pytest.raises(ValueError, match="verify"):
        FuseNormsConfig(verify="yes")


@pytest.mark.parametrize("arch, final", [("llama", "model.norm"), ("gemma", "model.norm"),
                                         ("opt", "model.decoder.final_layer_norm")])
def test_find_final_norm_while_blocks_are_on_meta(tmp_path, arch, final):
    _, path = saved_model(tmp_path, arch)
    lm = lazy(path)
    lm.materialize("")
    assert all(p.is_meta for p in lm.blocks.parameters())
    name, mod = find_final_norm(lm)
    assert name == final and mod is lm.model.get_submodule(final)
    assert norm_offset(mod, 64) == (1.0 if arch == "gemma" else 0.0)
    assert all(p.is_meta for p in lm.blocks.parameters())   # blocks restored, untouched


@pytest.mark.parametrize("arch", ["llama", "gemma", "opt"])
def test_fuse_norms_preserves_logits(tmp_path, arch):
    model, path = saved_model(tmp_path, arch)
    lm, fused, states, blocks = run_and_rebuild(path, [Step("fuse_norms", FuseNormsConfig())])
    assert_same_logits(logits(model), logits(fused))

    # every block norm now means "gain 1" (Gemma: offset 1 + w, so w = 0) and LayerNorm biases are 0
    ref = dict(model.named_parameters())
    offset = 1.0 if arch == "gemma" else 0.0
    for i, block in blocks.items():
        assert len(block.norms) == 2
        for g in block.norms:
            assert g.offset == offset
            assert torch.equal(states[i][g.weight], torch.full((64,), 1.0 - offset))
            if g.bias is not None:
                assert not states[i][g.bias].any()
                assert all(block.linears[r].has_bias for r in g.linears)
            for r in g.linears:   # the gain went into the readers' columns
                w0 = ref[f"{block.prefix}.{r}.weight"]
                gain = ref[f"{block.prefix}.{g.weight}"] + offset
                torch.testing.assert_close(states[i][f"{r}.weight"], w0 * gain, rtol=1e-6, atol=1e-7)

    # the final norm went into the head, which is untied from the embeddings
    name, norm = find_final_norm(lm)
    assert torch.equal(norm.weight, torch.full((64,), 1.0 - offset))
    head, emb = fused.get_output_embeddings(), fused.get_input_embeddings()
    assert not torch.allclose(head.weight, model.get_output_embeddings().weight)
    assert not torch.allclose(head.weight, emb.weight)
    assert lm.config.tie_word_embeddings is False
    if arch == "opt":   # bias-free head: the LayerNorm bias stays in the norm as b / gain
        assert head.bias is None and norm.bias.abs().max() > 0


def test_fuse_norms_creates_reader_bias(tmp_path):
    # OPT without linear biases: folding the LayerNorm bias has to create them
    model, path = saved_model(tmp_path, "opt", enable_bias=False)
    assert model.model.decoder.layers[0].self_attn.q_proj.bias is None
    lm, fused, states, blocks = run_and_rebuild(path, [Step("fuse_norms", FuseNormsConfig())])
    assert_same_logits(logits(model), logits(fused))
    assert "self_attn.q_proj.bias" in states[0] and "fc1.bias" in states[0]
    assert blocks[0].linears["fc1"].has_bias and not blocks[0].linears["fc2"].has_bias
