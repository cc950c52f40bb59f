"""Shared by the smoothing passes (smooth, awq): the producer -> consumers groups found by the dataflow analysis,
and the exact rescaling y = (W diag(s)) (x / s) absorbed into the producer, which leaves the float function unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScaleGroup:
    """Consumers read one tensor x; x's channels can be divided by s inside the producer (a norm or a linear)."""
    kind: str                      # "norm" | "vo" | "mlp"
    producer: str                  # norm module path or linear name
    consumers: list[str]
    channels: int                  # length of s as the consumers see it (their in_features)
    repeat: tuple[int, int, int] | None = None   # GQA (kv_heads, n_rep, head_dim): s shared by the query heads of a kv head

    def collapse(self, v: torch.Tensor) -> torch.Tensor:
        """A per-consumer-channel statistic reduced to the producer's channels (mean over the heads sharing a kv head)."""
        if self.repeat is None:
            return v
        kv, rep, hd = self.repeat
        return v.view(kv, rep, hd).mean(1).reshape(-1)

    def expand(self, s_prod: torch.Tensor) -> torch.Tensor:
        if self.repeat is None:
            return s_prod
        kv, rep, hd = self.repeat
        return s_prod.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)


def scale_groups(block, need_spec: bool = True) -> tuple[list[ScaleGroup], list[str]]:
    """Every smoothable group of the block, and a reason for each one that cannot be smoothed."""
    groups, skipped = [], []
    has = (lambda n: block.linears[n].spec is not None) if need_spec else (lambda n: True)
    for g in block.norms:
        if not any(has(l) for l in g.linears):
            continue
        if g.weight is None:
            skipped.append(f"{g.norm or 'norm'} -> {g.linears}: the norm has no gain to absorb a scale")
            continue
        if not g.exclusive:
            skipped.append(f"{g.norm} -> {g.linears}: the norm's output also feeds the residual stream (post-norm), "
                           f"so a scale folded into it would change that too")
            continue
        # every reader of the norm is rescaled (function preservation), quantized or not
        groups.append(ScaleGroup("norm", g.norm, list(g.linears), block.linears[g.linears[0]].in_features))
    readers = [l for l in block.input_readers if has(l)]
    if readers:
        skipped.append(f"block input -> {readers}: their producer (a norm) ran before the block, where no scale "
                       f"can be folded")
    for a in block.attentions:
        if has(a.o):
            rep = a.num_heads // a.num_kv_heads
            groups.append(ScaleGroup("vo", a.v, [a.o], block.linears[a.o].in_features,
                                     (a.num_kv_heads, rep, a.head_dim) if rep > 1 else None))
    for m in block.mlps:
        if not has(m.down):
            continue
        if not m.smoothable or len(m.ups) != 1:
            skipped.append(f"{m.ups} -> {m.down}: activation {m.act} is not positively homogeneous")
            continue
        groups.append(ScaleGroup("mlp", m.ups[0], [m.down], block.linears[m.down].in_features))
    return groups, skipped


def group_input(ctx, g: ScaleGroup) -> torch.Tensor:
    return ctx.inputs(g.consumers[0])


@torch.no_grad()
def apply_scale(block, g: ScaleGroup, s_prod: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by s."""
    s_prod = s_prod.double()
    s_cons = g.expand(s_prod)
    for name in g.consumers:
        w = block.linear_module(name).weight
        w.data = (w.data.double() * s_cons.view(1, -1)).to(w.dtype)
    if g.kind == "norm":
        ng = next(n for n in block.norms if n.norm == g.producer)
        gain = block.param(ng.weight)
        # Gemma-style norms use (offset + w): the effective gain is what gets divided
        gain.data = (((gain.data.double() + ng.offset) / s_prod) - ng.offset).to(gain.dtype)
        if ng.bias is not None:
            b = block.param(ng.bias)
            b.data = (b.data.double() / s_prod).to(b.dtype)
    else:
        lin = block.linear_module(g.producer)
        lin.weight.data = (lin.weight.data.double() / s_prod.view(-1, 1)).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (lin.bias.data.double() / s_prod).to(lin.bias.dtype)
