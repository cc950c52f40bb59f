"""Post-norm blocks (BERT): q/k/v read the block's input as it arrives (normalised at the end of the previous block),
and the attention output's LayerNorm feeds the residual add as well as the intermediate linear, so no scale may be
folded into it. The analysis places every linear and marks that norm; awq, smooth and fuse_norms leave the float
block's function unchanged and say what they skipped; fuse_norms' epilogue finds no head to fold into."""
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from dcc.compiler.pass_manager import Step
from dcc.ir.capture import capture
from dcc.models.encoder import Encoder
from dcc.passes.base import get_pass

from tiny_models import OUTLIERS, analysed_block, calib_ids, outlier_layer, run_on_copy, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def bert_layer():
    """Layer 0 of a random BertModel whose LayerNorm gains are 20x at OUTLIERS, captured on its calibration inputs:
    (layer, gm, params, args, kwargs), the template run_on_copy takes."""
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64)
    model = T.AutoModel.from_config(cfg, add_pooling_layer=False, attn_implementation="sdpa").eval()
    layer = model.encoder.layer[0]
    with torch.no_grad():
        for name, mod in layer.named_modules():
            if name.endswith("LayerNorm"):
                mod.weight[OUTLIERS] = 20.0
    lm = SimpleNamespace(model=model, blocks=model.encoder.layer)
    args, kwargs = Encoder().block0_inputs(lm, calib_ids(1, vocab=128, shape=(4, 32)), torch.device("cpu"))
    gm, params = capture(layer, args, kwargs)
    return layer, gm, params, args, kwargs


def test_every_linear_is_placed(bert_layer):
    layer, gm, params, *_ = bert_layer
    block = analysed_block(layer, gm, params, "encoder.layer.0")   # strict: raised "cannot place" before
    assert block.input_readers == ["attention.self.query", "attention.self.key", "attention.self.value"]
    (g,) = block.norms
    assert g.norm == "attention.output.LayerNorm" and g.linears == ["intermediate.dense"] and g.exclusive is False
    (a,) = block.attentions
    assert (a.q, a.k, a.v, a.o, a.num_heads, a.head_dim, a.rope) == (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", 4, 16, False)
    (m,) = block.mlps
    assert m.ups == ["intermediate.dense"] and m.down == "output.dense" and m.act == "gelu" and not m.smoothable


def test_pre_norm_groups_stay_exclusive():
    layer, gm, params, *_ = outlier_layer("llama")
    block = analysed_block(layer, gm, params)
    assert len(block.norms) == 2 and all(g.exclusive for g in block.norms) and block.input_readers == []


@pytest.mark.parametrize("name", ["awq", "smooth"])
def test_scaling_passes_preserve_the_post_norm_block(bert_layer, name):
    block, results, err = run_on_copy(bert_layer, [Step(name, get_pass(name).Config())])
    skipped = results[0].details["skipped"]
    assert any(s.startswith("attention.output.LayerNorm -> ['intermediate.dense']: the norm's output also feeds")
               for s in skipped), skipped
    assert any(s.startswith("block input -> ['attention.self.query'") for s in skipped), skipped
    # only v -> o is scaled; before, awq folded a scale into the LayerNorm and moved this block's output by 0.3
    # without a word, and smooth stopped with a preservation error
    assert err < 1e-5, f"{name} changed the float block output by {err:.2e} (relative)"


def test_fuse_norms_keeps_a_shared_norm(bert_layer):
    """Before, it folded the gain and its own check stopped the compile (the output moved by 0.8)."""
    block, results, err = run_on_copy(bert_layer, [Step("fuse_norms", get_pass("fuse_norms").Config())])
    assert results[0].changed is False and err < 1e-6
    assert torch.equal(block.module.attention.output.LayerNorm.weight, bert_layer[0].attention.output.LayerNorm.weight)


def test_fuse_norms_epilogue_without_a_head(tmp_path):
    """A base model (BertModel, pooler included) has no head to fold a final norm into: nothing to do, said in a note
    (before, the pooler after the last block was reported as standing between the blocks and a head)."""
    from dcc.compiler.context import BlockContext
    from dcc.models.loader import LazyModel
    T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path)
    lm = LazyModel(tmp_path)
    assert lm.model.pooler is not None
    lm.materialize("")
    ctx = BlockContext(None, (), {}, torch.device("cpu"))
    res = get_pass("fuse_norms")().model_epilogue(lm, get_pass("fuse_norms").Config(), ctx)
    assert res.changed is False and res.message == "no output head"
    assert ctx.messages == ["fuse_norms: the model has no output head, nothing to fold the final norm into"]
