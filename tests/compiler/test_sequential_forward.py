"""dcc/compiler/sequential.py, blocks fed by the model's own forward (ModelForward): every block is compiled on the
inputs the forward calls it with, so each takes its quantized predecessors' outputs -- directly where one block
feeds the next (FLUX's double to single blocks), through the model's code where there is code between them (a
UNet's resnets and convolutions) -- in the order the forward calls them; a block called twice or never is refused."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers (pip install -e '.[diffusers]')")

import tiny_diffusers as td  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (autouse)
from dcc.compiler.sequential import ModelForward, compile_blocks  # noqa: E402
from dcc.models.diffusers_calib import CalibInputs  # noqa: E402
from dcc.models.loader import LazyModel  # noqa: E402
from dcc.targets.base import get_target  # noqa: E402


def _nunchaku_rtn():
    t = get_target("nunchaku")
    opts = t.options(algo="rtn", unsupported="keep")
    return t.pipeline(opts), t.assigner(opts, t.spec(opts))


def _compile(tmp_path, cls):
    """(lm, [(prefix, args, kwargs, quantized outputs)] in compile order, float inputs of each block)."""
    td.save(tmp_path, cls)
    lm = LazyModel(tmp_path)
    kw, layout = td.random_inputs(cls, 2)
    batch = CalibInputs.from_kwargs(cls, kw, layout, 2)
    # the float model's own block inputs, for comparison
    full = td.build(cls)
    floats = {}
    hooks = [full.get_submodule(lm.block_prefix(i)).register_forward_pre_hook(
        lambda m, a, k, p=lm.block_prefix(i): floats.setdefault(p, (a, k)), with_kwargs=True)
        for i in range(len(lm.blocks))]
    with torch.no_grad():
        full(**lm.adapter.forward_kwargs(batch))
    for h in hooks:
        h.remove()
    seen = []
    steps, assign = _nunchaku_rtn()
    compile_blocks(lm, steps, lm.adapter.block_inputs(lm, batch, "cpu"), assign, progress=False,
                   on_block=lambda b, ctx: seen.append((b.prefix, ctx.args, ctx.kwargs, ctx.forward_full())))
    return lm, seen, floats


def _tensors(args, kwargs):
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def test_flux_blocks_take_their_quantized_predecessors_outputs(tmp_path):
    lm, seen, floats = _compile(tmp_path, "FluxTransformer2DModel")
    assert [p for p, *_ in seen] == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                                     "single_transformer_blocks.1"]
    # block 0 sees what the float model gives it; the first blocks are not quantized yet
    assert all(torch.equal(a, b) for a, b in zip(_tensors(*seen[0][1:3]), _tensors(*floats[seen[0][0]])))
    for (_, _, _, out), (prefix, args, kwargs, _) in zip(seen, seen[1:]):
        enc, hidden = out   # each FLUX block returns (encoder_hidden_states, hidden_states)
        assert torch.equal(kwargs["hidden_states"], hidden) and torch.equal(kwargs["encoder_hidden_states"], enc)
        # ... which are not the float model's: the quantization error of the blocks before travels on
        assert not torch.allclose(kwargs["hidden_states"], floats[prefix][1]["hidden_states"], atol=1e-6)


def test_unet_blocks_run_in_forward_order_through_the_convolutions(tmp_path):
    lm, seen, floats = _compile(tmp_path, "UNet2DConditionModel")
    order = [p for p, *_ in seen]
    # the forward's order (down, mid, up), not the module tree's (down, up, mid)
    assert order == ["down_blocks.1.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0.transformer_blocks.1",
                     "mid_block.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.1",
                     "up_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.0.transformer_blocks.1",
                     "up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.0.attentions.1.transformer_blocks.1"]
    assert torch.equal(seen[0][1][0], floats[order[0]][0][0])
    assert torch.equal(seen[1][1][0], seen[0][3])   # within one Transformer2DModel: the previous block's output
    # across proj_out, a resnet, a downsampler and proj_in: the mid block computes on the quantized down blocks
    mid = seen[2][1][0]
    assert mid.shape == floats[order[2]][0][0].shape and not torch.allclose(mid, floats[order[2]][0][0], atol=1e-6)


class _Toy(nn.Module):
    def __init__(self, calls):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)) for _ in range(2)])
        self.calls = calls

    def forward(self, x):
        for i in self.calls:
            x = self.blocks[i](x)
        return x


@pytest.mark.parametrize("calls,message", [
    ([0, 0, 1], "blocks.0: the model's forward calls this block twice"),
    ([0], "blocks.1: the model's forward never called this block on the calibration inputs"),
])
def test_blocks_called_twice_or_never_are_refused(calls, message):
    model = _Toy(calls)
    lm = SimpleNamespace(model=model, blocks=list(model.blocks), block_prefix=lambda i: f"blocks.{i}",
                         materialize=lambda p: model.get_submodule(p) if p else model, release=lambda p: None)
    steps, assign = _nunchaku_rtn()
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        compile_blocks(lm, steps, ModelForward(lambda: model(x)), assign, progress=False)
    assert "forward" not in model.blocks[0].__dict__ and "forward" not in model.blocks[1].__dict__
