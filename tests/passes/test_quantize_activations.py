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


# ------------------------------------------------------------------------ unsigned inputs after a GELU ("uint4")

class _GeluMLP(torch.nn.Module):
    """x + fc2(gelu(fc1(x))), the GELU output rounded to bf16 as an engine's 16-bit activations are: the graph's
    shifted input is then exactly the kernel's (one rounding of gelu + shift), so its codes are the kernel's."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x) * 3).to(torch.bfloat16).float())


def _mlp_block(fc2_act, seed=0):
    from dcc.compiler.context import BlockContext
    from dcc.ir.capture import capture
    from dcc.ir.formats import QuantSpec
    from tiny_models import analysed_block
    torch.manual_seed(seed)
    module, x = _GeluMLP().eval(), torch.randn(4, 16, 64)
    gm, params = capture(module, (x,), {})
    block = analysed_block(module, gm, params, prefix="mlp")
    for name, lin in block.linears.items():
        lin.spec = QuantSpec("int4", symmetric=True, group_size=64, scale_dtype="bfloat16")
        lin.act = fc2_act if name == "fc2" else "int4:bfloat16"
    return block, BlockContext(block, (x,), {}, torch.device("cpu"))


def _fc2_io(block, ctx):
    """(fc2's 16-bit input, fc2's output) as the block's graph computes them with the engine's numerics."""
    lin = linear_nodes(block.gm)["fc2"]
    gelu = next(n for n in block.gm.graph.nodes if n.op == "call_function" and "gelu" in str(n.target))
    seen = {}
    with torch.no_grad():
        run_recording(block.gm, block.module, ctx.args, ctx.kwargs,
                      {gelu.name: lambda v: seen.setdefault("h", v.to(torch.bfloat16)),
                       lin.name: lambda v: seen.setdefault("y", v)}, engine=True)
    return seen["h"].reshape(-1, 128), seen["y"].reshape(-1, 64)


def test_unsigned_shift_is_folded_into_the_bias_and_the_graph_is_the_kernel():
    from dcc.ir.w4a4 import quantize_act_int4, shift_compensation
    from dcc.passes.rtn import RtnConfig
    from dcc.targets.nunchaku.reference import NunchakuLinear
    block, ctx = _mlp_block("uint4:bfloat16")
    float_out = ctx.forward().clone()
    b0, w0 = block.module.fc2.bias.data.clone(), block.module.fc2.weight.data.clone()
    res, = run_block(block, [Step("quantize_activations", QuantizeActivationsConfig())], ctx, PassTiming(), debug=True)
    assert res.changed and res.details["unsigned"] == ["fc2"] and "1 unsigned after GELU" in res.message
    assert res.details["output_rel_err"] < 1e-6                    # the float function stands (the shift is taken back)
    torch.testing.assert_close(block.module.fc2.bias.data.double(), b0.double() - shift_compensation(w0))
    # the collected input is the shifted one; quantization takes the bias to the quantized weight, in bf16
    assert torch.allclose(ctx.inputs("fc2").min(), torch.tensor(0.0), atol=0.01)
    run_block(block, [Step("rtn", RtnConfig())], ctx, PassTiming())
    mod = block.module.fc2
    bias = mod.bias.data
    assert torch.equal(bias, bias.bfloat16().float())
    want = (b0.double() - shift_compensation(mod.weight.data)).bfloat16().double()
    assert float((bias.double() - want).abs().max()) <= float(want.abs().max()) * 2 ** -8   # at most one bf16 ulp
    # the graph: u4 codes of gelu + shift (the kernel's, exactly: one rounding), the folded bias
    h16, y = _fc2_io(block, ctx)
    act = quantize_act_int4(h16, None, unsigned=True, dtype=torch.bfloat16)
    assert float(act.codes.min()) >= 0 and int(act.codes.max()) == 15
    ideal = act.dequantize().double() @ mod.weight.data.double().T + bias.double()
    torch.testing.assert_close(y.double(), ideal, rtol=1e-5, atol=1e-5)
    # the CPU reference of the kernel (16-bit accumulation) agrees to bf16 precision; without the fold it would not
    qt = block.linears["fc2"].qtensor
    ref = NunchakuLinear("int4", qt.codes.to(torch.int8), qt.scale, bias=bias, unsigned=True)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())   # noqa: E731
    assert rel(ref(h16.float()), y) < 1e-2
    unfolded = NunchakuLinear("int4", qt.codes.to(torch.int8), qt.scale, bias=b0, unsigned=True)
    assert rel(unfolded(h16.float()), y) > 10 * rel(ref(h16.float()), y)


def test_unsigned_inputs_quantize_gelu_outputs_better():
    from dcc.passes.rtn import RtnConfig
    errs = {}
    for fmt in ("int4:bfloat16", "uint4:bfloat16"):
        block, ctx = _mlp_block(fmt, seed=1)
        ref = ctx.forward().clone() - ctx.args[0]
        run_block(block, [Step("quantize_activations", QuantizeActivationsConfig()), Step("rtn", RtnConfig())], ctx,
                  PassTiming())
        out = ctx.forward(simulate=True) - ctx.args[0]
        errs[fmt] = float((out - ref).norm() / ref.norm())
    assert errs["uint4:bfloat16"] < 0.9 * errs["int4:bfloat16"], errs
