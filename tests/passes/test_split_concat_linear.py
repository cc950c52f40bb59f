"""split_concat_linear (dcc/passes/split_concat_linear.py, ir/rewrite_split.py): a linear reading cat([a, b], -1)
becomes two linears, one per concatenated input, each with its own weight columns (the bias on the last); the block's
function is kept, the IR's linears follow, and a run on fewer samples (another capture) replays the rewrite."""
import torch

from dcc.compiler.context import BlockContext
from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.analysis import analyse
from dcc.ir.capture import capture, typed_nodes
from dcc.ir.graph import AnalysisError, Block
from dcc.ir.program import copy_graph
from dcc.ir.rewrite import gelu_fed, linear_nodes
from dcc.ir.rewrite_split import concat_fed, split_paths
from dcc.passes.split_concat_linear import SplitConcatLinearConfig


class _Single(torch.nn.Module):
    """FLUX's single block in small: proj_out reads cat(attention-like branch, gelu(proj_mlp(x)))."""

    def __init__(self):
        super().__init__()
        self.to_v, self.proj_mlp = torch.nn.Linear(64, 64), torch.nn.Linear(64, 128)
        self.proj_out = torch.nn.Linear(64 + 128, 64)

    def forward(self, x):
        a = torch.tanh(self.to_v(x))
        b = torch.nn.functional.gelu(self.proj_mlp(x), approximate="tanh")
        return x + self.proj_out(torch.cat([a, b], dim=2))


def _block():
    torch.manual_seed(0)
    module, x = _Single().eval(), torch.randn(4, 8, 64)
    gm, params = capture(module, (x,), {})
    block = Block(0, "single_transformer_blocks.0", module)
    block.gm = copy_graph(gm)
    block.nodes = typed_nodes(block.gm, params)
    try:   # leniently, as a diffusion block is analysed: a linear reading a cat has no group
        analyse(block, block.gm, params, strict=False)
    except AnalysisError:
        pass
    return block, BlockContext(block, (x,), {}, torch.device("cpu"))


def test_paths_and_what_reads_a_concatenation():
    assert split_paths("attn.proj_out", 2) == ["attn.proj_out_cat0", "attn.proj_out_cat1"]
    block, _ = _block()
    assert concat_fed(block.gm) == {"proj_out": [64, 128]}


def test_split_keeps_the_function_and_gives_each_part_its_columns():
    block, ctx = _block()
    ref = ctx.forward().clone()
    w, b = block.module.proj_out.weight.data.clone(), block.module.proj_out.bias.data.clone()
    res, = run_block(block, [Step("split_concat_linear", SplitConcatLinearConfig())], ctx, PassTiming(), debug=True)
    assert res.changed and "proj_out -> proj_out_cat0 + proj_out_cat1" in res.message
    assert list(block.linears) == ["to_v", "proj_mlp", "proj_out_cat0", "proj_out_cat1"]
    a, m = block.module.proj_out_cat0, block.module.proj_out_cat1
    assert torch.equal(a.weight, w[:, :64]) and a.bias is None
    assert torch.equal(m.weight, w[:, 64:]) and torch.equal(m.bias, b)
    assert (block.linears["proj_out_cat0"].in_features, block.linears["proj_out_cat1"].in_features) == (64, 128)
    assert set(linear_nodes(block.gm)) == {"to_v", "proj_mlp", "proj_out_cat0", "proj_out_cat1"}
    torch.testing.assert_close(ctx.forward(), ref, rtol=1e-5, atol=1e-5)
    # the mlp part now reads the GELU itself: a target's rule sees it (Nunchaku: unsigned activations)
    assert gelu_fed(block.gm) == {"proj_out_cat1"}
    torch.testing.assert_close(ctx.forward(samples=2), ref[:2], rtol=1e-5, atol=1e-5)   # replayed on a new capture


def test_nothing_to_split_is_said_and_a_wrong_name_refused():
    block, ctx = _block()
    run_block(block, [Step("split_concat_linear", SplitConcatLinearConfig())], ctx, PassTiming())
    res, = run_block(block, [Step("split_concat_linear", SplitConcatLinearConfig())], ctx, PassTiming())
    assert not res.changed and res.message == "no linear reads a last-axis concatenation: nothing to split"
    block, ctx = _block()
    try:
        run_block(block, [Step("split_concat_linear", SplitConcatLinearConfig(only=("to_v",)))], ctx, PassTiming())
    except Exception as e:   # the pass manager re-raises naming the pass and the block
        assert "to_v does not read a last-axis concatenation" in str(e)
    else:
        raise AssertionError("splitting a linear that reads no concatenation must fail")
