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

from tiny_models import (VOCAB, assert_same_logits, calib_ids, compile_model, lazy, logits,  # noqa: F401
                         rebuild, run_and_rebuild, saved_model, tiny_config, tiny_model)


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
