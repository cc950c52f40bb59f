"""Fused linears (Phi-3's qkv_proj and gate_up_proj), split from the dataflow: a linear whose output the block reads
only in slices of its last axis that tile it is replaced by a SplitLinear, one nn.Linear per slice whose outputs are
concatenated (so the model's own forward still runs), and in the captured graph a slice of that concatenation that is
exactly one part reads the part directly. The analysis then sees q, k, v and gate, up as the projections they are,
and every pass and target treats them as it treats Llama's."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .capture import op_name
from .program import changed
from .rewrite import linear_nodes

# copies and casts between a linear and the slices that read it (the last axis is untouched)
_KEEP = {"to", "_to_copy", "type_as", "contiguous", "clone", "alias", "detach"}


class SplitLinear(nn.Module):
    """A fused linear as its parts: children '0', '1', ... (nn.Linear each, the rows of the fused weight in order);
    forward concatenates their outputs, which is the fused linear's output exactly."""

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        for i, p in enumerate(parts):
            self.add_module(str(i), p)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.children()], dim=-1)


def _op(n) -> str:
    return op_name(n.target) if isinstance(n, Node) and n.op == "call_function" else ""


def _last_axis(n: Node, dim) -> bool:
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and isinstance(dim, int) and dim % val.dim() == val.dim() - 1


def _ranges(n: Node, width: int) -> list[tuple[int, int]] | None:
    """The [start, end) ranges of the last axis that n's readers take, or None if a reader takes it otherwise."""
    out = []
    for u in n.users:
        op = _op(u)
        if op in _KEEP or op == "_assert_tensor_metadata":
            if op != "_assert_tensor_metadata":
                inner = _ranges(u, width)
                if inner is None:
                    return None
                out += inner
        elif op == "slice" and u.args[0] is n and _last_axis(n, u.args[1] if len(u.args) > 1 else 0):
            start = u.args[2] if len(u.args) > 2 and u.args[2] is not None else 0
            end = u.args[3] if len(u.args) > 3 and u.args[3] is not None else width
            step = u.args[4] if len(u.args) > 4 else 1
            if step != 1:
                return None
            out.append((start % width if start < 0 else start, min(end if end >= 0 else end % width, width)))
        elif op in ("chunk", "split", "split_with_sizes") and u.args[0] is n:
            dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
            if not _last_axis(n, dim):
                return None
            sizes = [v.shape[-1] for v in u.meta.get("val") or ()]
            if not sizes or any(g.op != "call_function" or _op(g) != "getitem" for g in u.users):
                return None
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            out += [(starts[i], starts[i] + sizes[i]) for i in sorted({g.args[1] for g in u.users})]
        else:
            return None
    return out


_ACTS = {"silu", "gelu", "relu", "sigmoid", "tanh", "gelu_tanh", "hardswish", "mish", "leaky_relu"}
_ATTENTION = {"scaled_dot_product_attention", "matmul", "bmm"}   # sdpa, or eager attention's Q K^T / P V


def _feeds_a_projection_role(lin: Node, hops: int = 16) -> bool:
    """Whether the slices of `lin` play the roles the analysis tells apart: some part reaches attention (through
    head reshapes and RoPE, not through another linear: q, k, v) or is read by an activation function (a gated
    MLP's gate). An adaLN modulation (shift, scale, gate read by adds and multiplies) plays none and stays fused."""
    seen, todo = set(), [(u, 0) for u in lin.users]
    while todo:
        n, d = todo.pop()
        if n in seen or d > hops or n.op != "call_function":
            continue
        seen.add(n)
        op = _op(n)
        if op in _ATTENTION or (op in _ACTS and d <= 3):
            return True
        if op != "linear":
            todo += [(u, d + 1) for u in n.users]
    return False


def sliced_linears(gm: GraphModule) -> dict[str, list[int]]:
    """{linear path: the widths of its parts} for every linear whose output is read only in last-axis slices that
    tile it exactly, two or more of them (a slice read twice counts once), and whose parts are projections of
    different roles (_feeds_a_projection_role)."""
    out = {}
    for path, lin in linear_nodes(gm).items():
        val = lin.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        width = int(val.shape[-1])
        ranges = _ranges(lin, width)
        if not ranges:
            continue
        ranges = sorted(set(ranges))
        tiles = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if len(ranges) >= 2 and tiles and ranges[0][0] == 0 and ranges[-1][1] == width \
                and _feeds_a_projection_role(lin):
            out[path] = [e - s for s, e in ranges]
    return out


@torch.no_grad()
def split_linears(module: nn.Module, widths: dict[str, list[int]]) -> None:
    """Replace each nn.Linear `path` of `module` by a SplitLinear of parts `widths[path]` (row slices of its weight
    and bias, same device and dtype; a meta module gets meta parts)."""
    for path, sizes in widths.items():
        old = module.get_submodule(path)
        if isinstance(old, SplitLinear):
            continue
        if not isinstance(old, nn.Linear) or sum(sizes) != old.out_features:
            raise ValueError(f"{path}: cannot split {type(old).__name__} of {getattr(old, 'out_features', '?')} "
                             f"outputs into parts of {sizes}")
        parts, start = [], 0
        for n in sizes:
            p = nn.Linear(old.in_features, n, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
            if not old.weight.is_meta:
                p.weight.copy_(old.weight[start:start + n])
                if old.bias is not None:
                    p.bias.copy_(old.bias[start:start + n])
            parts.append(p)
            start += n
        module.set_submodule(path, SplitLinear(parts))


def read_parts_directly(gm: GraphModule) -> int:
    """Every last-axis slice (or chunk piece) of a concatenation that is exactly one of its inputs becomes that
    input (a SplitLinear's output sliced as the fused linear's was); returns the number of reads redirected."""
    count = 0
    for cat in list(gm.graph.nodes):
        if _op(cat) != "cat" or not _last_axis(cat, cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)):
            continue
        parts = list(cat.args[0])
        sizes = [p.meta["val"].shape[-1] if isinstance(p.meta.get("val"), torch.Tensor) else None for p in parts]
        if None in sizes:
            continue
        starts = {sum(sizes[:i]): (i, sizes[i]) for i in range(len(sizes))}
        width = sum(sizes)
        for u in list(cat.users):
            op = _op(u)
            if op == "slice" and u.args[0] is cat:
                start = u.args[2] if len(u.args) > 2 and u.args[2] is not None else 0
                end = min(u.args[3] if len(u.args) > 3 and u.args[3] is not None else width, width)
                hit = starts.get(start)
                if hit is not None and start + hit[1] == end and (len(u.args) < 5 or u.args[4] == 1):
                    u.replace_all_uses_with(parts[hit[0]])
                    count += 1
            elif op in ("chunk", "split", "split_with_sizes") and u.args[0] is cat:
                pieces = [v.shape[-1] for v in u.meta.get("val") or ()]
                if pieces != sizes:
                    continue
                for g in list(u.users):
                    if _op(g) == "getitem":
                        g.replace_all_uses_with(parts[g.args[1]])
                        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        changed(gm)
    return count
