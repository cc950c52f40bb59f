"""Dataflow analysis of a captured block: norm -> linears, q/k/v -> attention -> o, up/gate -> down and the residual
stream, found from the graph's ops and edges alone (no table of module names per architecture)."""
from __future__ import annotations

import torch

from .attention_sites import attention_sites
from .capture import op_name
from .graph import MLP, AnalysisError, Attention, Linear, NormGroup, Residual

# Ops that move or retype data without mixing channels: a linear reading through them reads the same features.
_DTYPE_VIEW = {"to", "_to_copy", "type_as", "view", "reshape", "_unsafe_view", "contiguous", "clone", "dropout",
               "alias", "detach", "_assert_tensor_metadata", "getitem", "unflatten", "flatten"}
# Around attention, heads are split, transposed and repeated (GQA), which keeps the channel identity too.
_HEAD_OPS = _DTYPE_VIEW | {"transpose", "permute", "expand", "unsqueeze", "squeeze", "repeat_interleave", "repeat"}
_ACTS = {"silu", "gelu", "relu", "tanh", "sigmoid", "gelu_tanh", "hardswish", "mish", "leaky_relu"}
_ROPE_OPS = {"cat", "neg", "slice", "mul", "add", "sub", "view_as_complex", "view_as_real", "stack"}


def _op(n) -> str:
    return op_name(n.target) if n.op == "call_function" else n.op


def _data_arg(n):
    """The tensor an op passes along (first node argument; scalar operands of mul/add are constants)."""
    for a in n.args:
        if isinstance(a, torch.fx.Node):
            return a
    return None


def _through(n, ops: set[str]):
    """Walk back while the op is data-preserving (ops), or a multiply/divide by a Python scalar."""
    while n is not None and n.op == "call_function":
        op = _op(n)
        scalar_scale = op in ("mul", "div") and sum(isinstance(a, torch.fx.Node) for a in n.args) == 1
        if op not in ops and not scalar_scale:
            break
        n = _data_arg(n)
    return n


def _param(n, params) -> tuple[str, float] | None:
    """(parameter path, additive offset) if n is a parameter, possibly cast or shifted by a constant (Gemma: 1 + w)."""
    offset = 0.0
    while n is not None:
        if n.op == "placeholder":
            return (params[n.name], offset) if n.name in params else None
        op = _op(n)
        if op == "add" and len(n.args) == 2 and isinstance(n.args[1], (int, float)):
            offset += float(n.args[1])
        elif op not in _DTYPE_VIEW:
            return None
        n = _data_arg(n)
    return None


def _norm_at(n, params) -> tuple[NormGroup, object] | None:
    """A normalisation ending at node n: returns (group without readers, the node it normalises)."""
    op = _op(n)
    if op in ("layer_norm", "rms_norm"):
        w = _param(n.args[2], params) if len(n.args) > 2 and n.args[2] is not None else None
        b = _param(n.args[3], params) if op == "layer_norm" and len(n.args) > 3 and n.args[3] is not None else None
        kind = "layer" if op == "layer_norm" else "rms"
        return NormGroup(_owner(w or b), kind, w and w[0], b and b[0], 0.0, []), n.args[0]
    if op == "mul" and all(isinstance(a, torch.fx.Node) for a in n.args[:2]):
        for g, x in (n.args[:2], n.args[1::-1]):
            gain = _param(g, params)
            inner = _through(x, _DTYPE_VIEW)
            src = _rms_source(inner)
            if gain is not None and src is not None:
                return NormGroup(_owner(gain), "rms", gain[0], None, gain[1], []), src
    src = _rms_source(n)
    if src is not None:  # a norm with no gain (elementwise_affine=False)
        return NormGroup("", "rms", None, None, 0.0, []), src
    return None


def _rms_source(n):
    """x if n computes x * rsqrt(mean(x^2) + eps), else None."""
    if n is None or _op(n) != "mul":
        return None
    a, b = n.args[:2]
    for x, r in ((a, b), (b, a)):
        if isinstance(r, torch.fx.Node) and _op(_through(r, _DTYPE_VIEW)) == "rsqrt":
            return x
    return None


def _owner(p) -> str:
    return p[0].rpartition(".")[0] if p else ""


def _linears_behind(n, stop_ops=frozenset()) -> tuple[set, set]:
    """Every linear node reachable backwards from n (not crossing attention), and the ops met on the way."""
    seen, found, ops = set(), set(), set()
    stack = [n]
    while stack:
        m = stack.pop()
        if m is None or m in seen or m.op != "call_function":
            continue
        seen.add(m)
        op = _op(m)
        if op == "linear":
            found.add(m)
            continue
        if op in stop_ops:
            continue
        ops.add(op)
        stack.extend(m.all_input_nodes)
    return found, ops


def analyse(block, gm, params: dict[str, str], strict: bool = True) -> None:
    """Fill block.linears/norms/attentions/mlps/residual from the captured graph."""
    where = f"block {block.prefix}"
    lin_name, linears = {}, []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        op = _op(n)
        if op in ("addmm", "mm", "matmul", "bmm") and any(
                _param(_through(a, _HEAD_OPS | {"t", "numpy_T", "mT"}), params) for a in n.all_input_nodes):
            raise AnalysisError(f"{where}: node {n.name} ({op}) multiplies by a parameter outside nn.Linear "
                                f"(Conv1D-style or fused weights are not supported yet)")
        if op == "linear":
            p = _param(n.args[1], params)
            if p is None:
                raise AnalysisError(f"{where}: linear node {n.name} has a weight that is not a parameter")
            name = p[0].rpartition(".")[0]
            lin_name[n] = name
            linears.append(n)
            w = block.param(p[0])
            has_bias = len(n.args) > 2 and n.args[2] is not None
            block.linears[name] = Linear(name, w.shape[1], w.shape[0], has_bias)

    # norm -> linears
    groups: dict[str, NormGroup] = {}
    norm_inputs = {}
    for n in linears:
        src = _through(n.args[0], _DTYPE_VIEW)
        found = _norm_at(src, params) if src is not None and src.op == "call_function" else None
        if found is None:
            continue
        g, x = found
        key = g.weight or g.bias or src.name
        groups.setdefault(key, g).linears.append(lin_name[n])
        norm_inputs[key] = x
        if not _read_by_linears_only(src, set(linears)):
            groups[key].exclusive = False
    block.norms = list(groups.values())

    # attention (an sdpa node, or eager attention's softmax between two matmuls): q/k/v feed it, o reads it
    for site in attention_sites(gm):
        n = site.out
        roles, rope = {}, False
        for role, arg in zip("qkv", (site.q, site.k, site.v)):
            found, ops = _linears_behind(arg)
            if len(found) != 1:
                raise AnalysisError(f"{where}: attention node {n.name}: its {role} input comes from "
                                    f"{len(found)} linears ({sorted(lin_name[f] for f in found)}), expected one")
            roles[role] = next(iter(found))
            rope |= role in "qk" and bool(ops & {"cat", "neg", "view_as_complex"})
        readers = [l for l in linears if _through(l.args[0], _HEAD_OPS) is n]
        if len(readers) != 1:
            raise AnalysisError(f"{where}: attention node {n.name} is read by {len(readers)} linears, expected one")
        q_val, v_lin = site.q.meta["val"], roles["v"]
        head_dim = int(q_val.shape[-1])
        heads = block.linears[lin_name[roles["q"]]].out_features // head_dim
        kv_heads = block.linears[lin_name[v_lin]].out_features // head_dim
        block.attentions.append(Attention(lin_name[roles["q"]], lin_name[roles["k"]], lin_name[v_lin],
                                          lin_name[readers[0]], heads, kv_heads, head_dim, rope,
                                          site.q.name, site.k.name, module=_caller(site)))

    # up/gate -> down
    lin_set = set(linears)
    for n in linears:
        src = _through(n.args[0], _DTYPE_VIEW)
        if src is None or src.op != "call_function":
            continue
        op = _op(src)
        if op == "mul" and all(isinstance(a, torch.fx.Node) for a in src.args[:2]):
            ups, gate, act = [], None, None
            for a in src.args[:2]:
                a = _through(a, _DTYPE_VIEW)
                if a in lin_set:
                    ups.append(lin_name[a])
                elif _op(a) in _ACTS and _through(a.args[0], _DTYPE_VIEW) in lin_set:
                    gate, act = lin_name[_through(a.args[0], _DTYPE_VIEW)], _op(a)
            if len(ups) == 1 and gate:
                block.mlps.append(MLP(ups, gate, lin_name[n], act, True))
        elif op in _ACTS and _through(src.args[0], _DTYPE_VIEW) in lin_set:
            up = lin_name[_through(src.args[0], _DTYPE_VIEW)]
            block.mlps.append(MLP([up], None, lin_name[n], op, op == "relu"))

    _residual(block, gm, params, lin_name, groups, norm_inputs)

    # linears that read a block input unchanged (the hidden states of a post-norm block)
    block.input_readers = [lin_name[n] for n in linears if _block_input(_through(n.args[0], _DTYPE_VIEW), params)]

    placed = {l for g in block.norms for l in g.linears} | set(block.input_readers)
    placed |= {a.o for a in block.attentions} | {m.down for m in block.mlps}
    missing = [name for name in block.linears if name not in placed]
    if missing and strict:
        n = next(l for l in linears if lin_name[l] == missing[0])
        src = _through(n.args[0], _HEAD_OPS)
        raise AnalysisError(f"{where}: cannot place linear {missing[0]}: it reads {_op(src)} node {src.name}, "
                            f"which is neither a norm, an attention output nor an MLP activation")


def _caller(site) -> str:
    """The innermost module calling the attention (its nn_module_stack), '' where the graph does not say."""
    paths = [p for p in site.module_paths() if p]
    return paths[-1] if paths else ""


def _read_by_linears_only(n, linears: set) -> bool:
    """Whether every reader of n's value (through data-preserving ops) is a linear taking it as its input."""
    stack = list(n.users)
    while stack:
        u = stack.pop()
        if u in linears and _through(u.args[0], _DTYPE_VIEW) is n:
            continue
        if u.op == "call_function" and _op(u) in _DTYPE_VIEW:
            stack.extend(u.users)
            continue
        return False
    return True


def _block_input(n, params) -> bool:
    return n is not None and n.op == "placeholder" and n.name not in params


def _residual(block, gm, params, lin_name, groups, norm_inputs) -> None:
    """The stream: starts at the block input; each add of the stream and linear outputs continues it."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name not in params]
    if not inputs:
        return
    stream, writers = {inputs[0]}, []
    for n in gm.graph.nodes:
        if n.op != "call_function" or _op(n) != "add" or len(n.all_input_nodes) != 2:
            continue
        a, b = (_through(x, _DTYPE_VIEW) for x in n.args[:2])
        for s, other in ((a, b), (b, a)):
            if s in stream:
                found, ops = _linears_behind(other, stop_ops={"scaled_dot_product_attention"} | _ACTS)
                direct = [f for f in found if _through(other, _DTYPE_VIEW | {"add"}) is f or ops <= {"add"} | _DTYPE_VIEW]
                if direct:
                    writers += sorted(lin_name[f] for f in direct)
                    stream.add(n)
                break
    readers = [g.norm for k, g in groups.items() if _through(norm_inputs[k], _DTYPE_VIEW) in stream]
    block.residual = Residual(writers, readers)

