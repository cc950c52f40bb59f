"""Nunchaku (SVDQuant W4A4) target: the pass pipelines per algorithm, as literal lists, and the per-layer rule
(the weight spec, the run-time activation format -- unsigned after a GELU for INT4 --, the layers the layout cannot
take)."""
from __future__ import annotations

from ...compiler.pass_manager import Step
from ...ir.formats import QuantSpec
from ...ir.rewrite import gelu_fed
from ...passes.clip import ClipConfig
from ...passes.gptq import GptqConfig
from ...passes.quantize_activations import QuantizeActivationsConfig
from ...passes.rtn import RtnConfig
from ...passes.svd_lowrank import SvdLowrankConfig
from ..common import preflight as common
from .layout import LayoutError

# algorithm -> what it runs (the CLI's --help reads this); the first is the default
ALGOS = {
    "svdquant": "smoothing searched with the low-rank branch in the loop, a rank --rank SVD branch refined by "
                "alternation, the residual's clip ratios searched (INT4), W4A4 round to nearest (default)",
    "svdquant-gptq": "SVDQuant with GPTQ on the residual instead of round to nearest",
    "smoothquant": "the smoothing search alone (no branch), W4A4 round to nearest",
    "rtn": "W4A4 round to nearest (no smoothing, no branch)",
}
PRECISIONS = ("int4", "nvfp4")
# the kernels' only groups (research/targets.md 3A), weights and activations alike: INT4 one 16-bit scale per 64,
# NVFP4 one e4m3 micro-scale per 16
GROUP_SIZES = {"int4": 64, "nvfp4": 16}
GROUP_SIZE = GROUP_SIZES["int4"]


def pipeline(algo: str, rank: int = 32, precision: str = "int4") -> list[Step]:
    """The passes run on every block, in order."""
    # the engine's run-time numerics: W4A4 activations per token and group (64 INT4, 16 NVFP4), after the smoothing
    # division (and, INT4 after a GELU, the shift)
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
            # INT4: per 64-group clip ratios of the residual, searched on each linear's output error (its input is
            # x / smooth; q and k unclipped), on at most 4096 evenly spaced tokens (a diffusion transformer's
            # calibration holds ~10^5): SmolLM2 W4A4 r32 WikiText-2 43.31 -> 41.55 (bench/nunchaku_accuracy.py)
            *([Step("clip", ClipConfig(max_tokens=4096))] if precision == "int4" else []),
            # the residual quantized
            Step("rtn", RtnConfig()),
        ]
    if algo == "svdquant-gptq":
        return [Step("svd_lowrank", SvdLowrankConfig(rank=rank)), act, Step("gptq", GptqConfig())]
    raise ValueError(f"unknown algorithm {algo!r} for nunchaku; choose one of {', '.join(ALGOS)}")


def weight_spec(precision: str = "int4", scale_dtype: str = "bfloat16") -> QuantSpec:
    """INT4: symmetric signed codes in [-7, 7] (DeepCompressor's sint4: s = absmax / 7; the kernel's s4 range
    [-8, 7] is never reached by weights) per 64-group, the scale in the model's 16-bit dtype.
    NVFP4: e2m1 codes per 16-group with an fp8 e4m3 micro-scale, under one per-tensor scale in the model's 16-bit
    dtype (DeepCompressor's nvfp4.yaml: sfp4_e2m1_all, scale_dtypes [None, sfp8_e4m3_nan]; formats.two_level_qparams);
    Nunchaku stores them as wscales, wtscale (and wcscales, all ones)."""
    if precision == "int4":
        return QuantSpec("int4", symmetric=True, group_size=GROUP_SIZES["int4"], scale_dtype=scale_dtype)
    if precision == "nvfp4":
        return QuantSpec("fp4_e2m1", group_size=GROUP_SIZES["nvfp4"], scale_dtype=scale_dtype, micro_scale="fp8_e4m3")
    raise ValueError(f"precision {precision!r}: dcc writes Nunchaku's {', '.join(PRECISIONS)} checkpoints")


def check(name: str, n: int, k: int, group_size: int = GROUP_SIZE) -> None:
    """Nunchaku pads N and K to 128 itself; the groups of the activations and weights need K % group == 0 (64 for
    INT4, 16 for NVFP4)."""
    if k % group_size:
        kind = "NVFP4" if group_size == GROUP_SIZES["nvfp4"] else "INT4"
        raise LayoutError(f"{name}: in_features {k} is not a multiple of the group size {group_size} (W4A4 {kind})")


def preflight(lm, on_unsupported: str, precision: str = "int4") -> list[str]:
    g = GROUP_SIZES[precision]
    return common.preflight(lm, check, g, on_unsupported, (g,), LayoutError)


def make_spec_assigner(spec: QuantSpec, act: str, on_unsupported: str = "error"):
    """assign(block): the weight spec and the W4A4 activation format on every linear the layout takes (others stay
    16-bit with the reason). An INT4 linear reading a GELU's output gets "uint4" (Nunchaku's act_unsigned, as its
    mlp_fc2: u4 codes of the input shifted by 0.171875); NVFP4 quantizes every input signed (shift 0)."""
    group = spec.group_size

    def assign(block) -> None:
        lins = [(f"{block.prefix}.{n}", l.out_features, l.in_features) for n, l in block.linears.items()]
        problems = common.problems_for(lins, check, group)
        if problems and on_unsupported == "error":
            common.refuse(list(problems.values()), "use --unsupported keep (those layers stay 16-bit)", LayoutError)
        unsigned = gelu_fed(block.gm) if act.startswith("int4:") and block.gm is not None else set()
        for name, lin in block.linears.items():
            why = problems.get(f"{block.prefix}.{name}")
            lin_act = "u" + act if name in unsigned else act
            lin.spec, lin.act, lin.skip_reason = (None, None, why) if why else (spec, lin_act, None)

    return assign
