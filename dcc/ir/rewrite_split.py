"""A graph rewrite that splits a linear reading a concatenation along its input axis, linear(cat([a, b], -1), W, bias)
-> linear(a, W[:, :Da]) + linear(b, W[:, Da:], bias), into one linear per concatenated input, each reading its own
weight (and the last one the bias): Nunchaku's FLUX single block stores proj_out so, as out_proj and mlp_fc2, each
with its own smoothing, branch and activation quantization (research/nunchaku_2026.md B.1).

The parts' parameters live at new module paths (split_paths); the rewrite only edits the graph, so it replays on
every capture of the block (ir/rewrite.py's convention)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .capture import op_name
from .program import add_param_input, changed, drop_unused_inputs
from .rewrite import _meta_like, linear_nodes


def split_paths(path: str, parts: int) -> list[str]:
    """The module paths of the parts of linear `path`: 'proj_out' -> ['proj_out_cat0', 'proj_out_cat1'] (siblings
    of the linear, so they register on its parent module)."""
    return [f"{path}_cat{i}" for i in range(parts)]


def _last_dim(n: torch.fx.Node) -> int | None:
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else None


def concat_fed(gm: GraphModule) -> dict[str, list[int]]:
    """{linear path: the widths of its concatenated inputs} for the linears whose input is an aten.cat along the last
    axis of two or more tensors (read directly: a cast in between would change what each part reads)."""
    out = {}
    for path, lin in linear_nodes(gm).items():
        x = lin.args[0]
        if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and op_name(x.target) == "cat"):
            continue
        parts = x.args[0]
        dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
        nd = _last_dim(x)
        if nd is None or dim not in (-1, nd - 1) or len(parts) < 2:
            continue
        widths = [p.meta["val"].shape[-1] if isinstance(p.meta.get("val"), torch.Tensor) else None for p in parts]
        if None not in widths:
            out[path] = [int(w) for w in widths]
    return out


def split_concat_linear(gm: GraphModule, path: str) -> None:
    """Replace linear `path` (whose input is a last-axis cat of n tensors) by n linears reading the n tensors and the
    weights `split_paths(path, n)[i].weight`, summed in input order; the last part reads `...bias` if the original
    read a bias. The original weight (and bias) placeholders are dropped when nothing else reads them."""
    lin = linear_nodes(gm).get(path)
    if lin is None:
        raise ValueError(f"{path}: no linear node reads {path}.weight in the block's graph")
    cat = lin.args[0]
    if path not in concat_fed(gm):
        raise ValueError(f"{path}: its input is not a concatenation along the last axis")
    parts = list(cat.args[0])
    names = split_paths(path, len(parts))
    has_bias = len(lin.args) > 2 and lin.args[2] is not None
    keep = {k: v for k, v in lin.meta.items() if k in ("nn_module_stack",)}
    weights = [add_param_input(gm, f"{p}.weight") for p in names]
    bias = add_param_input(gm, f"{names[-1]}.bias") if has_bias else None
    w_val = lin.args[1].meta.get("val")
    for w, x in zip(weights, parts):
        if isinstance(w_val, torch.Tensor):
            w.meta["val"] = w_val.new_empty(w_val.shape[0], x.meta["val"].shape[-1])
    if bias is not None and isinstance(w_val, torch.Tensor):
        bias.meta["val"] = w_val.new_empty(w_val.shape[0])
    y = None
    with gm.graph.inserting_before(lin):
        for i, (w, x) in enumerate(zip(weights, parts)):
            args = (x, w, bias) if (i == len(parts) - 1 and bias is not None) else (x, w)
            h = gm.graph.call_function(torch.ops.aten.linear.default, args)
            h.meta = {**keep, "val": lin.meta.get("val")}
            if y is None:
                y = h
            else:
                # summed in input order: (a Wa^T + b Wb^T) + bias equals the fused linear up to float rounding
                y = gm.graph.call_function(torch.ops.aten.add.Tensor, (y, h))
                y.meta = _meta_like(lin)
    lin.replace_all_uses_with(y)
    gm.graph.erase_node(lin)
    if not cat.users:
        gm.graph.erase_node(cat)
    drop_unused_inputs(gm)
    changed(gm)
