"""Attention in a captured block, in either form transformers runs it: one scaled_dot_product_attention node, or eager
attention, matmul(Q, K^T) -> scale, soft-cap, mask -> softmax -> matmul(P, V) (Gemma 2 runs eagerly: sdpa has no
tanh soft-cap of the scores). Either is an AttentionSite: the node the output projection reads, and the query, key and
value as attention reads them, [batch, heads, tokens, head_dim] (the key before its transpose)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .capture import op_name

_MATMUL = {"matmul", "bmm"}
# between the probabilities and P @ V: the cast back to the query's dtype, dropout (p = 0 in eval), copies
_AFTER_SOFTMAX = {"to", "_to_copy", "type_as", "dropout", "clone", "contiguous", "alias", "detach"}
# between Q K^T and the softmax: the 1/sqrt(d) scale, the soft-cap (x / c, tanh, * c), the additive mask, casts
_SCORE_OPS = {"mul", "div", "tanh", "add", "sub", "to", "_to_copy", "type_as", "clone", "contiguous", "alias",
              "masked_fill", "where"}


@dataclass(frozen=True)
class AttentionSite:
    """out: the node holding attention's output (the sdpa node, or eager attention's P @ V matmul); q, k, v: its
    inputs [batch, heads, tokens, head_dim], the key untransposed; eager: whether it is the eager form."""
    out: Node
    q: Node
    k: Node
    v: Node
    eager: bool = False

    @property
    def scores(self) -> Node | None:
        """Eager attention's Q K^T node (None for sdpa)."""
        return _scores_of(self) if self.eager else None

    def module_paths(self) -> list[str]:
        """The module paths that call this attention (nn_module_stack of its output node), outermost first."""
        return [p for p, _ in (self.out.meta.get("nn_module_stack") or {}).values()]


def _op(n) -> str:
    return op_name(n.target) if isinstance(n, Node) and n.op == "call_function" else ""


def _qk_matmul(n: Node, budget: int = 16) -> Node | None:
    """The Q K^T matmul the softmax input is computed from, walking back through scale, soft-cap and mask ops (the
    mask side of an add reaches no matmul, so every node input is tried)."""
    if budget <= 0 or not isinstance(n, Node):
        return None
    op = _op(n)
    if op in _MATMUL:
        return n
    if op not in _SCORE_OPS:
        return None
    for a in n.all_input_nodes:
        found = _qk_matmul(a, budget - 1)
        if found is not None:
            return found
    return None


def _untransposed(k_t: Node) -> Node | None:
    """K from the K^T attention multiplies by: the input of a transpose of its last two axes."""
    if _op(k_t) != "transpose" or not isinstance(k_t.args[0], Node):
        return None
    val = k_t.args[0].meta.get("val")
    nd = val.dim() if isinstance(val, torch.Tensor) else 4
    return k_t.args[0] if {d % nd for d in k_t.args[1:3]} == {nd - 2, nd - 1} else None


def _pv_matmul(softmax: Node) -> Node | None:
    """The P @ V matmul reading the probabilities (through casts and dropout) as its left operand."""
    todo = list(softmax.users)
    while todo:
        u = todo.pop()
        op = _op(u)
        if op in _MATMUL and _through_back(u.args[0]) is softmax:
            return u
        if op in _AFTER_SOFTMAX:
            todo.extend(u.users)
    return None


def _through_back(n):
    while _op(n) in _AFTER_SOFTMAX and isinstance(n.args[0], Node):
        n = n.args[0]
    return n


def _scores_of(site: AttentionSite) -> Node | None:
    p = _through_back(site.out.args[0])
    return _qk_matmul(p.args[0]) if _op(p) in ("softmax", "_softmax") else None


def _eager_site(softmax: Node) -> AttentionSite | None:
    """The eager attention around a softmax over the last axis, or None if this softmax is something else."""
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    val = softmax.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or dim not in (-1, 3):
        return None
    qk, pv = _qk_matmul(softmax.args[0]), _pv_matmul(softmax)
    if qk is None or pv is None:
        return None
    k = _untransposed(qk.args[1])
    if k is None:
        return None
    return AttentionSite(pv, qk.args[0], k, pv.args[1], eager=True)


def attention_sites(gm: GraphModule) -> list[AttentionSite]:
    """Every attention of the graph, in graph order."""
    out = []
    for n in gm.graph.nodes:
        op = _op(n)
        if op == "scaled_dot_product_attention":
            out.append(AttentionSite(n, n.args[0], n.args[1], n.args[2]))
        elif op in ("softmax", "_softmax"):
            site = _eager_site(n)
            if site is not None:
                out.append(site)
    return out

