"""quantize_activations: a graph pass. The linears the target marks get dcc::quant_act_int8 inputs in the block's
graph; the engine-mode output changes, the float function and the collected inputs do not, and a run on fewer
samples (another capture) replays the rewrite."""
import torch

from dcc.compiler.pass_manager import PassTiming, Step, run_block
from dcc.ir.actquant import fake_quantize_tokens_int8
from dcc.ir.program import run_recording
from dcc.ir.rewrite import linear_nodes
from dcc.passes.quantize_activations import QuantizeActivationsConfig

from tiny_models import fresh_block, outlier_layer

TEMPLATE = outlier_layer()


def test_inserts_int8_inputs_and_keeps_the_float_function():
    block, ctx = fresh_block(TEMPLATE)
    float_out, x_down = ctx.forward().clone(), ctx.inputs("mlp.down_proj").clone()
    res, = run_block(block, [Step("quantize_activations", QuantizeActivationsConfig())], ctx, PassTiming())
    assert res.message == "no linear's input is quantized at run time" and not block.rewrites
    for name in ("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"):
        block.linears[name].act = "int8"
    res, = run_block(block, [Step("quantize_activations", QuantizeActivationsConfig())], ctx, PassTiming())
    assert res.message.startswith("2 int8 per-token quantization node(s) before 3 linear(s)")   # gate/up share one
    assert [n.target for n in block.nodes if n.kind == "runtime"] == ["quant_act_int8"] * 2
    assert torch.equal(ctx.forward(), float_out) and torch.equal(ctx.inputs("mlp.down_proj"), x_down)
    engine = ctx.forward(simulate=True)
    assert not torch.equal(engine, float_out)
    # what the engine's down_proj sees: its input (itself computed from int8 gate/up inputs) on the int8 grid
    seen = {}
    q = linear_nodes(block.gm)["mlp.down_proj"].args[0]
    with torch.no_grad():
        run_recording(block.gm, block.module, ctx.args, ctx.kwargs,
                      {q.name: lambda v: seen.setdefault("q", v), q.args[0].name: lambda v: seen.setdefault("x", v)},
                      engine=True)
    assert torch.equal(seen["q"], fake_quantize_tokens_int8(seen["x"])) and not torch.equal(seen["q"], seen["x"])
    torch.testing.assert_close(ctx.forward(simulate=True, samples=2), engine[:2])
    assert not torch.allclose(ctx.forward(samples=2), engine[:2])
