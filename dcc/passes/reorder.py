"""Channel reordering (QServe/QoQ, Lin et al., 2024): the input channels of down_proj and o_proj are sorted by their
activation absmax, so that channels of similar magnitude share a weight quantization group. The permutation is folded
into the producers' output rows (up/gate, v_proj per KV head): no runtime index, and the float function is unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pass, PassConfig, PassResult, register

KINDS = ("mlp", "vo")


@dataclass(frozen=True)
class ReorderConfig(PassConfig):
    """kinds: which channels to sort ("mlp": up/gate rows with down_proj's input columns, "vo": each KV head's v_proj
    rows with the o_proj input columns of every query head reading it); verify: check that the float block's output
    is unchanged. Only consumers quantized in groups (spec.group_size > 0) are reordered. Example:
    ReorderConfig(kinds=("mlp",))."""
    kinds: tuple[str, ...] = KINDS
    verify: bool = True

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))   # a YAML list becomes a tuple
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"reorder: kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"reorder: verify must be a bool, got {self.verify!r}")


def channel_order(x_max: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dimension by absmax, descending; stable, so ties (dead channels) keep their order."""
    return torch.sort(x_max, dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def _take(t: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    """t <- t permuted along dim by idx (a permutation: exact, no rounding)."""
    t.data = t.data.index_select(dim, idx.to(t.device)).contiguous()


def _groups(block, kinds) -> tuple[list[tuple[str, list[str], str]], list[str]]:
    """(kind, producers whose output rows move, consumer whose input columns move) for the selected kinds whose
    consumer is quantized in groups, and a reason for each one left as it is."""
    cands, out, skipped = [], [], []
    if "mlp" in kinds:
        # the activation between them is elementwise, so it commutes with a permutation (any activation, gated or not)
        cands += [("mlp", list(m.ups) + ([m.gate] if m.gate else []), m.down, 0) for m in block.mlps]
    if "vo" in kinds:
        cands += [("vo", [a.v], a.o, a.head_dim) for a in block.attentions]
    for kind, producers, consumer, d in cands:
        spec = block.linears[consumer].spec
        if spec is None or spec.group_size <= 0:
            skipped.append(f"{consumer}: {'no spec' if spec is None else 'not quantized in groups'}")
        elif d and spec.group_size % d == 0:   # channels stay in their head: every group keeps its channels
            skipped.append(f"{consumer}: its groups of {spec.group_size} hold whole heads of {d}, so an order within "
                           f"each head changes no group")
        elif any(block.linears[n].qtensor is not None or block.linears[n].clip is not None
                 for n in producers + [consumer]):
            raise ValueError(f"reorder: {consumer} is already quantized or clipped; list reorder before clip and the "
                             f"quantize passes")
        else:
            out.append((kind, producers, consumer))
    return out, skipped


def _head_order(a, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vo: (v_proj row order, o_proj column order). Each KV head gets its own order of its head_dim channels,
    sorted by the max over the query heads that read it (GQA); channels never leave their head."""
    kv, rep, d = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    order = channel_order(x_max.view(kv, rep, d).amax(1))                      # [kv, d], within-head indices
    v_idx = (order + torch.arange(kv, device=order.device).view(kv, 1) * d).reshape(-1)
    heads = torch.arange(kv * rep, device=order.device).view(kv, rep, 1)   # query head h reads KV head h // rep
    o_idx = order.view(kv, 1, d).expand(kv, rep, d) + heads * d
    return v_idx, o_idx.reshape(-1)


def _uniformity(x: torch.Tensor, g: int) -> float | None:
    """Mean over the consumer's quantization groups of min/max of the input absmax (1: a group's channels are
    alike, what reordering aims at); None when the groups do not tile the channels."""
    if x.numel() % g:
        return None
    x = x.view(-1, g)
    return round(float((x.amin(1) / x.amax(1).clamp(min=1e-12)).mean()), 6)


@register
class Reorder(Pass):
    Config = ReorderConfig
    uses_activations = True
    preserves_function = True   # checked by the pass manager (verify, or --debug)
    ensures = ("reordered",)
    forbids = ("clipped", "quantized")   # per-group clip ranges follow the channel order: reorder first

    @torch.no_grad()
    def run(self, block, config, ctx) -> PassResult:
        groups, skipped = _groups(block, config.kinds)
        if not groups:
            return PassResult(False, f"nothing to reorder (it only helps group quantization): {'; '.join(skipped)}",
                              {"skipped": skipped})
        # every group's statistic is its consumer's input, which only that group's permutation changes
        x_max = {c: ctx.stats.absmax(ctx.inputs(c)) for _, _, c in groups}
        attn, details = {a.o: a for a in block.attentions}, {}
        for kind, producers, consumer in groups:
            x = x_max[consumer]
            rows, cols = _head_order(attn[consumer], x) if kind == "vo" else (channel_order(x),) * 2
            for p in producers:
                lin = block.linear_module(p)
                _take(lin.weight, rows, 0)
                if lin.bias is not None:
                    _take(lin.bias, rows, 0)
            _take(block.linear_module(consumer).weight, cols, 1)
            g = block.linears[consumer].spec.group_size
            details[consumer] = {"kind": kind, "producers": producers, "group_size": g,
                                 "moved": int((cols.cpu() != torch.arange(cols.numel())).sum()),
                                 "group_min_over_max": _uniformity(x, g),
                                 "group_min_over_max_after": _uniformity(x[cols], g)}
        for s in skipped:
            ctx.log(f"reorder: skipped {s}")
        ctx.invalidate()
        out = {"groups": details, "skipped": skipped}
        msg = f"{len(groups)} group(s) reordered ({', '.join(sorted({k for k, _, _ in groups}))})"
        return PassResult(True, msg + (f", {len(skipped)} skipped" if skipped else ""), out, facts=self.ensures)
