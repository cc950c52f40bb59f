"""Nunchaku (SVDQuant W4A4) target: the pass pipelines per algorithm, as literal lists, and the per-layer rule
(the weight spec, the run-time activation format, the layers the layout cannot take)."""
from __future__ import annotations

from ...compiler.pass_manager import Step
from ...ir.formats import QuantSpec
from ...passes.gptq import GptqConfig
from ...passes.quantize_activations import QuantizeActivationsConfig
from ...passes.rtn import RtnConfig
from ...passes.svd_lowrank import SvdLowrankConfig
from ..common import preflight as common
from .layout import LayoutError

# algorithm -> what it runs (the CLI's --help reads this); the first is the default
ALGOS = {
    "svdquant": "smoothing searched with the low-rank branch in the loop, a rank --rank SVD branch refined by "
                "alternation, W4A4 round to nearest (default)",
    "svdquant-gptq": "SVDQuant with GPTQ on the residual instead of round to nearest",
    "smoothquant": "the smoothing search alone (no branch), W4A4 round to nearest",
    "rtn": "W4A4 round to nearest (no smoothing, no branch)",
}
PRECISIONS = ("int4",)
GROUP_SIZE = 64      # INT4: the kernel's only group (research/targets.md 3A); weights and activations alike


def pipeline(algo: str, rank: int = 32) -> list[Step]:
    """The passes run on every block, in order."""
    # the engine's run-time numerics: W4A4 activations, per token and 64-group (after the smoothing division)
    act = Step("quantize_activations", QuantizeActivationsConfig())
    if algo == "rtn":
        return [act, Step("rtn", RtnConfig())]
    if algo == "smoothquant":
        return [Step("svd_lowrank", SvdLowrankConfig(rank=0)), act, Step("rtn", RtnConfig())]
    if algo == "svdquant":
        return [
            # smoothing + low-rank branch (a graph rewrite: the linear reads x / smooth, the branch reads x)
            Step("svd_lowrank", SvdLowrankConfig(rank=rank)),
            act,
            # the residual quantized
            Step("rtn", RtnConfig()),
        ]
    if algo == "svdquant-gptq":
        return [Step("svd_lowrank", SvdLowrankConfig(rank=rank)), act, Step("gptq", GptqConfig())]
    raise ValueError(f"unknown algorithm {algo!r} for nunchaku; choose one of {', '.join(ALGOS)}")


def weight_spec(precision: str = "int4", scale_dtype: str = "bfloat16") -> QuantSpec:
    """INT4: symmetric signed codes in [-7, 7] (DeepCompressor's sint4: s = absmax / 7; the kernel's s4 range
    [-8, 7] is never reached by weights) per 64-group, the scale in the model's 16-bit dtype."""
    if precision != "int4":
        raise ValueError(f"precision {precision!r}: dcc writes Nunchaku's int4 checkpoints (nvfp4 is not done yet)")
    return QuantSpec("int4", symmetric=True, group_size=GROUP_SIZE, scale_dtype=scale_dtype)


def check(name: str, n: int, k: int, group_size: int = GROUP_SIZE) -> None:
    """Nunchaku pads N and K to 128 itself; the 64-groups of the activations and weights need K % 64 == 0."""
    if k % group_size:
        raise LayoutError(f"{name}: in_features {k} is not a multiple of the group size {group_size} (W4A4 INT4)")


def preflight(lm, on_unsupported: str) -> list[str]:
    return common.preflight(lm, check, GROUP_SIZE, on_unsupported, (GROUP_SIZE,), LayoutError)


def make_spec_assigner(spec: QuantSpec, act: str, on_unsupported: str = "error"):
    """assign(block): the weight spec and the W4A4 activation format on every linear the layout takes (others stay
    16-bit with the reason)."""
    def assign(block) -> None:
        lins = [(f"{block.prefix}.{n}", l.out_features, l.in_features) for n, l in block.linears.items()]
        problems = common.problems_for(lins, check, GROUP_SIZE)
        if problems and on_unsupported == "error":
            common.refuse(list(problems.values()), "use --unsupported keep (those layers stay 16-bit)", LayoutError)
        for name, lin in block.linears.items():
            why = problems.get(f"{block.prefix}.{name}")
            lin.spec, lin.act, lin.skip_reason = (None, None, why) if why else (spec, act, None)

    return assign
