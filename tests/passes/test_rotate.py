"""rotate: after fuse_norms, the residual stream of tiny saved Llama / Gemma models is rotated (embeddings, every block,
the head, optionally v -> o per head); the rebuilt model computes the same logits. Misuse fails loudly."""

import pytest
import torch

from dcc.compiler.pass_manager import PassError, Step
from dcc.ir.hadamard import rotation_matrix
from dcc.passes.base import get_pass
from dcc.passes.fuse_norms import FuseNormsConfig
from dcc.passes.rotate import Rotate, RotateConfig
from dcc.passes.smooth import SmoothConfig


from tiny_models import assert_same_logits, compile_model, logits, run_and_rebuild, saved_model

FUSE = Step("fuse_norms", FuseNormsConfig())


def test_registered_and_config():
    assert get_pass("rotate") is Rotate
    c = RotateConfig(kind="random", seed=3, heads=False)
    assert RotateConfig.from_dict(c.to_dict()) == c
    for bad in ({"kind": "givens"}, {"seed": -1}, {"heads": "no"}):
        with pytest.raises(ValueError, match="rotate"):
            RotateConfig(**bad)


@pytest.mark.parametrize("arch, kind, heads", [("llama", "hadamard", True), ("llama", "random_hadamard", False),
                                               ("llama", "random", True), ("gemma", "hadamard", True)])
def test_rotate_preserves_logits(tmp_path, arch, kind, heads):
    model, path = saved_model(tmp_path, arch)
    cfg = RotateConfig(kind=kind, seed=5, heads=heads)
    lm, rotated, states, blocks = run_and_rebuild(path, [FUSE, Step("rotate", cfg)])
    assert_same_logits(logits(model), logits(rotated))

    # the embeddings are exactly E R (the stream is rotated), the head untied from them
    R = rotation_matrix(64, kind, 5)
    E0 = model.get_input_embeddings().weight.double()
    E1 = rotated.get_input_embeddings().weight.double()
    torch.testing.assert_close(E1, E0 @ R, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(E1, E0, atol=1e-3)
    assert not torch.allclose(rotated.get_output_embeddings().weight, rotated.get_input_embeddings().weight)
    # writers: R^T W (checked on o_proj, whose input side the per-head rotation also touches when heads=True)
    p = blocks[0].prefix
    ref = dict(model.named_parameters())
    down0, down1 = ref[f"{p}.mlp.down_proj.weight"].double(), states[0]["mlp.down_proj.weight"].double()
    torch.testing.assert_close(down1, R.T @ down0, rtol=1e-5, atol=1e-6)
    o0, o1 = ref[f"{p}.self_attn.o_proj.weight"].double(), states[0]["self_attn.o_proj.weight"].double()
    assert torch.allclose(o1, R.T @ o0, atol=1e-6) is not heads


def test_rotate_tied_head_and_then_smooth(tmp_path):
    # tied embeddings: the head gets its own tensor; smoothing after rotation still preserves the function
    model, path = saved_model(tmp_path, "llama", tie_word_embeddings=True)
    steps = [FUSE, Step("rotate", RotateConfig()), Step("smooth", SmoothConfig(alpha=0.5))]
    lm, out, states, blocks = run_and_rebuild(path, steps)
    assert lm.config.tie_word_embeddings is False
    assert_same_logits(logits(model), logits(out))


def test_rotate_size_without_hadamard(tmp_path):
    # 66 is not a multiple of 4: no Hadamard matrix; kind=random works for any size (head_dim 22 too)
    kw = dict(hidden_size=66, num_attention_heads=3, num_key_value_heads=1)
    model, path = saved_model(tmp_path, "llama", **kw)
    with pytest.raises(PassError, match=r"rotate failed in its model prologue.*66.*kind='random'"):
        compile_model(path, [FUSE, Step("rotate", RotateConfig(kind="hadamard"))])
    lm, rotated, states, blocks = run_and_rebuild(path, [FUSE, Step("rotate", RotateConfig(kind="random"))])
    assert_same_logits(logits(model), logits(rotated))


def test_rotate_needs_fused_norms(tmp_path):
    _, path = saved_model(tmp_path, "llama")
    with pytest.raises(PassError, match=r"rotate.*norms_fused.*list fuse_norms before it"):
        compile_model(path, [Step("rotate", RotateConfig())])


def test_rotate_rejects_layernorm(tmp_path):
    _, path = saved_model(tmp_path, "opt")
    with pytest.raises((ValueError, PassError), match="LayerNorm|does not commute"):
        compile_model(path, [FUSE, Step("rotate", RotateConfig())])


def test_rotate_block_check_names_layernorm(tmp_path, monkeypatch):
    # past the final-norm check in the prologue, a LayerNorm inside a block is named by the per-block check
    import dcc.passes.rotate as rot
    monkeypatch.setattr(rot, "find_final_norm", lambda lm, trace=None: None)
    _, path = saved_model(tmp_path, "opt")
    with pytest.raises(PassError, match=r"block model.decoder.layers.0 uses LayerNorm"):
        compile_model(path, [FUSE, Step("rotate", RotateConfig(verify=False))])
