"""TinyChat (AWQ W4A16) target: the pass pipelines per algorithm, as literal lists, and the per-layer spec rule."""
from __future__ import annotations

from ...compiler.pass_manager import Step
from ...ir.formats import QuantSpec
from ...passes.awq import AwqConfig
from ...passes.clip import ClipConfig
from ...passes.gptq import GptqConfig
from ...passes.rtn import RtnConfig
from ..common import preflight as common
from ..common.awq_layout import GROUP_SIZES, KERNEL_GROUP_SIZES, LayoutError, check_shape

# algorithm -> what it runs (the CLI's --help reads this); the first is the default
ALGOS = {
    "awq": "activation-aware scales + clip search, then round to nearest (default)",
    "rtn": "round to nearest",
    "gptq": "Hessian error feedback, act-order, static groups",
    "awq+gptq": "AWQ scales and clip ranges, then GPTQ",
}


def pipeline(algo: str) -> list[Step]:
    """The passes run on every block, in order."""
    if algo == "rtn":
        return [
            # quantization
            Step("rtn", RtnConfig()),
        ]
    if algo == "awq":
        return [
            # smoothing: activation-aware scales folded into the producers
            Step("awq", AwqConfig()),
            # range: per-group clip ratios
            Step("clip", ClipConfig()),
            # quantization
            Step("rtn", RtnConfig()),
        ]
    if algo == "gptq":
        return [
            # quantization with error feedback
            Step("gptq", GptqConfig()),
        ]
    if algo == "awq+gptq":
        return [
            Step("awq", AwqConfig()),
            Step("clip", ClipConfig()),
            # GPTQ's static groups take the clip ratios
            Step("gptq", GptqConfig()),
        ]
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")


def weight_spec(bits: int = 4, group_size: int = 128, scale_dtype: str = "float16",
                zero: str = "float") -> QuantSpec:
    """TinyChat's numerics: unsigned codes, scales in the activation dtype, and the kernel's dequantisation
    w = fp16(q*s + sz), one fused multiply-add, which the fake quantization reproduces. The kernel takes any 16-bit
    sz: zero="float" uses that freedom (the grid spans the group's [min, max], like GGUF's Q4_1); zero="integer" is
    AWQ's convention, sz = -(s*z) with an integer z."""
    if zero not in ("float", "integer"):
        raise ValueError(f"zero must be 'float' or 'integer', got {zero!r}")
    return QuantSpec(dtype=f"int{bits}", symmetric=False, group_size=group_size, scale_dtype=scale_dtype,
                     zero_mode="float" if zero == "float" else "scaled")


def preflight(lm, spec: QuantSpec, on_unsupported: str) -> list[str]:
    """Check every block's linears against the layout before any work (shapes are known on the meta device).
    Returns the reasons for layers that will stay 16-bit; raises naming the first bad layer under 'error' (and
    whenever no layer fits), suggesting only group sizes that fit every layer."""
    return common.preflight(lm, check_shape, spec.group_size, on_unsupported, sorted(GROUP_SIZES, reverse=True),
                            LayoutError, describe=lambda g: "" if g in KERNEL_GROUP_SIZES else " (dcc runtime only)")


def make_spec_assigner(spec: QuantSpec, on_unsupported: str = "error"):
    """Returns assign(block): give every linear the spec, or (on_unsupported='keep') keep layers whose shape the
    layout cannot take in 16-bit with the reason recorded; 'error' raises naming every such layer of the block."""
    if on_unsupported not in ("error", "keep"):
        raise ValueError(f"on_unsupported must be 'error' or 'keep', got {on_unsupported!r}")

    def assign(block) -> None:
        problems = []
        for name, lin in block.linears.items():
            try:
                check_shape(f"{block.prefix}.{name}", lin.out_features, lin.in_features, spec.group_size)
                lin.spec = spec
            except LayoutError as e:
                if on_unsupported == "error":
                    problems.append(str(e))
                lin.spec, lin.skip_reason = None, str(e)
        if problems:
            raise LayoutError(f"{len(problems)} layers cannot take this layout: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))

    return assign
