"""QServe target (W4A8KV4, QoQ; W8A8 SmoothQuant): the pass pipelines as literal lists, the weight specs, and the
per-layer rule that also marks the run-time int8 activations and the KV cache precision the engine applies."""
from __future__ import annotations

from ...compiler.pass_manager import Step
from ...ir.formats import QuantSpec
from ...passes.clip import ClipConfig
from ...passes.fuse_norms import FuseNormsConfig
from ...passes.gptq import GptqConfig
from ...passes.quantize_activations import QuantizeActivationsConfig
from ...passes.quantize_kv_cache import QuantizeKvCacheConfig
from ...passes.reorder import ReorderConfig
from ...passes.rotate import RotateConfig
from ...passes.rtn import RtnConfig
from ...passes.smooth import SmoothConfig
from ...passes.smooth_attention import SmoothAttentionConfig
from ..common import preflight as common
from .layout import LayoutError, check_shape

# algorithm -> what it runs (the CLI's --help reads this); the first is the default
ALGOS = {
    "qoq": "fuse norms, Hadamard rotation, reorder (groups), searched smoothing, SmoothAttention, clip, GPTQ "
           "(default)",
    "qoq-rtn": "QoQ with round to nearest instead of GPTQ",
    "gptq": "fuse norms, then GPTQ",
    "rtn": "fuse norms, then round to nearest",
    "smoothquant": "W8A8 (--bits 8): SmoothQuant alpha 0.5, then round to nearest",
}
GROUP_SIZES = (0, 64, 128)   # 0: per channel; 128: QServe's g128 kernel; 64: dcc's runtime only


def engine_steps(kv: bool = True) -> list[Step]:
    """The engine's run-time numerics inserted into each block's graph as dcc:: ops, first, so that every score
    and every block output after them is what QServe computes: int8 per-token activations, and the KV cache."""
    steps = [Step("quantize_activations", QuantizeActivationsConfig())]
    return steps + [Step("quantize_kv_cache", QuantizeKvCacheConfig())] if kv else steps


def qoq_steps(w8: bool = False, grouped: bool = False, rotate: bool = True, smooth: bool = True,
              smooth_attention: bool = True, reorder: bool = True, clip: bool = True, gptq: bool = True,
              attention_search: bool = True, kv: bool = True) -> list[Step]:
    """QoQ as a list of switchable phases (the benchmark's ablation rows use the switches); attention_search False:
    SmoothAttention at QoQ's fixed alpha 0.5."""
    steps = engine_steps(kv) + [
        # QServe's W4A8 loader ignores every *norm* weight: the gains must live in the linears
        Step("fuse_norms", FuseNormsConfig()),
    ]
    if rotate:
        # the residual stream and each head's values rotated by Hadamards: activation outliers spread out
        steps.append(Step("rotate", RotateConfig()))
    if reorder and grouped:
        # channels of like magnitude share a quantization group (only groups can use it)
        steps.append(Step("reorder", ReorderConfig()))
    if smooth:
        # per group, alpha searched on the block output error under W4A8KV4; norms cannot absorb a scale in W4A8
        # (their weights are ignored), so only v -> o and up -> down are smoothed there
        steps.append(Step("smooth", SmoothConfig(search=True, samples=2,
                                                 groups=("norm", "vo", "mlp") if w8 else ("vo", "mlp"))))
    if smooth_attention:
        # post-RoPE keys flattened for the 4-bit cache, queries scaled up to compensate; alpha in {0, 0.2, ..., 1}
        # searched per layer on the block output under W4A8KV4 (SmolLM2 g64 KV4: 37.32 vs 38.54 at QoQ's fixed 0.5)
        steps.append(Step("smooth_attention", SmoothAttentionConfig(search=True, grid=5, samples=2)
                          if attention_search else SmoothAttentionConfig(alpha=0.5)))
    if clip and not w8:
        # weight ranges: per row (and group) the shrink of [min, max] with the smallest output error; per channel the
        # error is summed over the tokens themselves (a row is wider than the token count), so 512 evenly spaced
        # calibration tokens keep the whole compile under 3 minutes (SmolLM2 KV4: 42.38 vs 44.08 with 1024)
        steps.append(Step("clip", ClipConfig(grid=20, max_tokens=1024 if grouped else 512)))
    # quantization: GPTQ's error feedback or round to nearest, on the target's (progressive) spec
    steps.append(Step("gptq", GptqConfig()) if gptq else Step("rtn", RtnConfig()))
    return steps


def pipeline(algo: str, bits: int = 4, group_size: int = 0, kv_bits: int | None = 4) -> list[Step]:
    """The passes run on every block, in order."""
    w8, grouped, kv = bits == 8, group_size > 0, kv_bits is not None
    if algo == "qoq":
        return qoq_steps(w8, grouped, smooth_attention=kv, kv=kv)
    if algo == "qoq-rtn":
        return qoq_steps(w8, grouped, smooth_attention=kv, gptq=False, kv=kv)
    if algo == "smoothquant":
        if not w8:
            raise ValueError("smoothquant is the W8A8 recipe: use --bits 8 (or --algo qoq for W4A8)")
        # SmoothQuant W8A8: alpha 0.5 on every group, as the best peer row (ModelOpt); QServe's W8A8 loader keeps
        # the norm weights, so the norms absorb their scales
        return engine_steps(kv) + [Step("smooth", SmoothConfig(alpha=0.5)), Step("rtn", RtnConfig())]
    if algo == "gptq":
        return engine_steps(kv) + [Step("fuse_norms", FuseNormsConfig()), Step("gptq", GptqConfig())]
    if algo == "rtn":
        return engine_steps(kv) + [Step("fuse_norms", FuseNormsConfig()), Step("rtn", RtnConfig())]
    raise ValueError(f"unknown algorithm {algo!r} for qserve; choose one of {', '.join(ALGOS)}")


def weight_spec(bits: int = 4, group_size: int = 0) -> QuantSpec:
    """W4 per channel: uint4 codes with an fp16 scale and a free fp16 zero (w = q*s1 - s1_szeros, applied by the
    GEMM epilogue, so never rounded to 16 bits: zero_mode 'offset'). W4 groups: QoQ's progressive two-level spec
    (int8 per channel in the protective range, then uint4 groups with int8 scales and zeros). W8: symmetric int8 per
    channel ([-127, 127], fp16 scale)."""
    if bits == 8:
        if group_size != 0:
            raise ValueError("qserve W8A8 is per channel: use --group-size 0")
        return QuantSpec("int8", symmetric=True, group_size=0, scale_dtype="float16")
    if bits != 4:
        raise ValueError(f"qserve takes 4-bit (W4A8) or 8-bit (W8A8) weights, not {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"qserve W4A8 group size must be 0 (per channel) or 128 (64: dcc's runtime only), "
                         f"got {group_size}")
    if group_size == 0:
        return QuantSpec("int4", symmetric=False, group_size=0, scale_dtype="float16", zero_mode="offset")
    return QuantSpec("int4", symmetric=False, group_size=group_size, scale_dtype="float16", progressive=True)


def _checker(spec: QuantSpec):
    """check(name, n, k, group_size) for this spec's bits: the W4A8 tile rules, or W8A8's."""
    def check(name: str, n: int, k: int, group_size: int) -> None:
        if spec.bits == 8:
            if n % 32 or k % 32:   # QServe's W8A8 GEMM tiles (kept to the W4A8 rule, which covers them)
                raise LayoutError(f"{name}: [{n}, {k}] is not a multiple of 32 in both dimensions (QServe W8A8)")
            return
        check_shape(name, n, k, 128 if group_size == 128 else 0)
        if group_size > 0 and k % group_size:
            raise LayoutError(f"{name}: in_features {k} is not a multiple of the group size {group_size}")
    return check


def _candidates(spec: QuantSpec) -> tuple[int, ...]:
    return (0,) if spec.bits == 8 else (0, 128, 64)


def preflight(lm, spec: QuantSpec, on_unsupported: str) -> list[str]:
    """Check every block's linears against the layout before any work; returns the reasons for layers kept 16-bit
    (raises under 'error', and whenever no layer fits, suggesting only options that fit)."""
    return common.preflight(lm, _checker(spec), spec.group_size, on_unsupported, _candidates(spec), LayoutError,
                            describe=lambda g: " (dcc runtime only)" if g == 64 else "")


def make_spec_assigner(spec: QuantSpec, on_unsupported: str = "error", kv_bits: int | None = 4):
    """assign(block): the weight spec and int8 per-token inputs on every linear the layout takes (others stay 16-bit
    with the reason), and the KV cache bits on every attention."""
    if on_unsupported not in ("error", "keep"):
        raise ValueError(f"on_unsupported must be 'error' or 'keep', got {on_unsupported!r}")
    if kv_bits not in (None, 4, 8):
        raise ValueError(f"kv_bits must be 4, 8 or None (16-bit), got {kv_bits!r}")

    def assign(block) -> None:
        lins = [(f"{block.prefix}.{n}", l.out_features, l.in_features) for n, l in block.linears.items()]
        problems = common.problems_for(lins, _checker(spec), spec.group_size)
        if problems and on_unsupported == "error":
            common.refuse(list(problems.values()), "the layout preflight lists the options that fit", LayoutError)
        for name, lin in block.linears.items():
            why = problems.get(f"{block.prefix}.{name}")
            lin.spec, lin.act, lin.skip_reason = (None, None, why) if why else (spec, "int8", None)
        for a in block.attentions:
            a.kv_bits = kv_bits

    return assign
