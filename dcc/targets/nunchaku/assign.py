"""The per-layer rule of a diffusers model written as Nunchaku's single file (naming.py): W4A4 (the target's spec and
activation format) where Nunchaku stores W4A4, AWQ W4A16 g64 (no activation quantization) for the AdaNorm /
modulation linears, 16 bits for the rest; and the plan that decides, before any block is compiled, whether the model
can be written as Nunchaku's file at all (else the artifact is dcc-runtime's, with the reason in the manifest).

AWQ zero points: DeepCompressor packs these layers with a fixed PreScale zero 7 around symmetric codes (research/
deepcompressor.md 3, convert_to_nunchaku_w4x16_linear_weight); dcc quantizes them asymmetrically (codes 0..15, an
integer zero per group) with the zero stored as wzeros = -(z * s), AWQ's convention, which gemv_awq decodes as one
fused q * s + wzeros in 16 bits -- the "scaled" zero mode, whose fake quantization reproduces that rounding."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...ir.capture import typed_nodes
from ...ir.formats import QuantSpec
from ...passes.split_concat_linear import split_block
from . import expected_keys as ek
from . import naming
from .pipeline import GROUP_SIZES

AWQ_GROUP = ek.AWQ_GROUP_SIZE


def awq_spec(scale_dtype: str) -> QuantSpec:
    """Nunchaku's AWQ W4A16 (gemv_awq): unsigned int4 codes, one 16-bit scale and integer zero per 64 inputs."""
    return QuantSpec("int4", symmetric=False, group_size=AWQ_GROUP, scale_dtype=scale_dtype, zero_mode="scaled")


def unsplit(path: str) -> str:
    """The diffusers module of a dcc linear: a split part 'x.proj_out_cat1' belongs to 'x.proj_out'."""
    head, sep, tail = path.rpartition("_cat")
    return head if sep and tail.isdigit() else path


@dataclass
class Plan:
    """What Nunchaku.for_model decided for one compile (make_plan): the Nunchaku names (None: a dcc-runtime artifact, `why` says why),
    the kind of each diffusers linear, and the options the emitter needs."""
    diffusers_class: str | None = None
    flux: str = "legacy"
    names: naming.NunchakuNames | None = None
    kinds: dict[str, str] = field(default_factory=dict)      # diffusers path -> w4a4 | awq (others: 16-bit)
    biased: set[str] = field(default_factory=set)             # diffusers linears that have a bias
    why: str | None = None
    by_part: dict = field(default_factory=dict, repr=False)   # diffusers path -> the stored layers holding it

    @property
    def active(self) -> bool:
        return self.names is not None

    def stored_of(self, path: str) -> naming.StoredLayer | None:
        """The stored layer holding diffusers linear `path` (a split part: the one whose columns it reads)."""
        base = unsplit(path)
        for sl in self.by_part.get(base, ()):
            if sl.layer.cols == "all" or path == base or (sl.layer.cols == "attn") == path.endswith("_cat0"):
                return sl
        return None

    def index(self) -> None:
        self.by_part = {}
        for sl in self.names.layers:
            for p in sl.parts:
                self.by_part.setdefault(p, []).append(sl)


def _paths(model: nn.Module) -> tuple[list[str], dict[str, tuple[int, int]], set[str], set[str]]:
    """Every linear and conv of the model (paths), their (out, in), the convs and the modules with a bias."""
    paths, shapes, convs, biased = [], {}, set(), set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            paths.append(name)
            shapes[name] = (m.out_features, m.in_features)
        elif isinstance(m, nn.Conv2d):
            paths.append(name)
            convs.add(name)
            shapes[name] = (m.out_channels, m.in_channels)
        else:
            continue
        if m.bias is not None:
            biased.add(name)
    return paths, shapes, convs, biased


def make_plan(lm, precision: str, rank: int, flux: str = "legacy") -> Plan:
    """The plan of a model: active when its class has a Nunchaku loader and every layer Nunchaku stores in 4 bits
    is a linear dcc quantizes, of a shape the class takes (W4A4 K % group; the Python classes N, K % 128; AWQ N % 8,
    K % 64); otherwise inactive, with the first reason."""
    cls = type(lm.model).__name__
    plan = Plan(cls, flux)
    if getattr(getattr(lm, "adapter", None), "kind", None) != "diffusers":
        return plan
    model_class = naming.nunchaku_model_class(cls, flux)
    if model_class is None:
        plan.why = f"{cls} has no Nunchaku loader: the artifact is for dcc's runtime"
        return plan
    paths, shapes, convs, plan.biased = _paths(lm.model)
    plan.kinds = naming.nunchaku_linears(cls, paths, flux)
    conv4 = sorted(p for p in plan.kinds if p in convs)
    if conv4:
        plan.why = (f"{conv4[0]}: {model_class} stores this convolution in 4 bits, and dcc quantizes linears only; "
                    f"the artifact is for dcc's runtime")
        return plan
    try:
        names = naming.nunchaku_names(cls, [p for p, k in plan.kinds.items() if k == ek.W4A4], paths, flux)
        spec = ek.model_spec(names.model_class)
        group = GROUP_SIZES[precision]
        for sl in names.layers:
            if sl.kind not in (ek.W4A4, ek.AWQ):
                continue
            n, k = naming.stored_shape(sl, shapes)
            ek.stored_dims(spec, sl.kind, n, k, rank, sl.prefix)
            if sl.kind == ek.W4A4 and k % group:
                raise ek.SpecError(f"{sl.prefix}: in_features {k} is not a multiple of the group size {group}")
    except (naming.NamingError, ek.SpecError) as e:
        plan.why = f"{e}; the artifact is for dcc's runtime"
        return plan
    plan.names = names
    plan.index()
    return plan


def make_assigner(base, base_keep, spec_dtype: str, plan: Plan):
    """assign(block): with an active plan, first split the linears whose input Nunchaku splits by columns (the FLUX
    single block's proj_out, split_concat_linear), then the base rule (W4A4 spec, unsigned after a GELU), then the
    AWQ spec on AdaNorm linears and 16 bits on what Nunchaku keeps in 16 bits; without one, the base rule alone.
    base_keep: the base rule keeping (not refusing) layers the layout cannot take: with a plan, those Nunchaku stores
    in 4 bits were checked already, and the others stay 16-bit whatever their shape."""
    awq = awq_spec(spec_dtype)

    def rewrite_now(block):
        def rewrite(fn):
            out = fn(block.gm)
            block.rewrites.append(fn)
            block.nodes = typed_nodes(block.gm)
            return out
        return rewrite

    def assign(block) -> None:
        if not plan.active:
            return base(block)
        split = [n for n in block.linears if (sl := plan.stored_of(f"{block.prefix}.{n}")) is not None
                 and sl.layer.cols != "all"]
        if split and block.gm is not None:
            split_block(block, rewrite_now(block), tuple(split))
        base_keep(block)
        for name, lin in block.linears.items():
            full = f"{block.prefix}.{name}"
            kind = plan.kinds.get(unsplit(full))
            if kind == ek.W4A4:
                if lin.spec is None:
                    raise naming.NamingError(f"{full}: {plan.names.model_class} stores it W4A4, but it stays 16-bit "
                                             f"({lin.skip_reason})")
                # one smoothing and one branch per stored layer (its fused parts), as the file holds them
                stored = plan.stored_of(full)
                lin.group = stored.prefix if stored is not None else None
            elif kind == ek.AWQ:
                lin.spec, lin.act, lin.skip_reason = awq, None, None
            else:
                lin.spec, lin.act = None, None
                lin.skip_reason = f"{plan.names.model_class} keeps this linear in 16 bits"

    return assign
