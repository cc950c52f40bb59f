"""Graph rewrites that insert dcc:: ops (ir/ops.py) into a captured block: the engine's run-time numerics where the
target's specs ask for them. Nodes are found from the graph alone (a linear by its weight's parameter path, an
attention by the module that calls it), so a rewrite applies the same way to every capture of a block (another
batch size, the runtime's reference model)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from . import ops, w4a4
from .attention_sites import AttentionSite, attention_sites
from .capture import op_name
from .program import add_param_input, changed, drop_unused_inputs, param_paths

# what may sit between an activation function and the linear reading it without changing values: casts and copies
_PASS_VALUES = {"to", "_to_copy", "type_as", "view", "reshape", "_unsafe_view", "contiguous", "clone", "alias",
                "detach", "dropout", "_assert_tensor_metadata"}
# what sits between a K/V cache and attention: the GQA repeat (slice, unsqueeze, expand, reshape) and copies
_REPEAT = {"expand", "unsqueeze", "reshape", "view", "_unsafe_view", "clone", "contiguous", "repeat_interleave",
           "repeat", "slice", "alias", "_assert_tensor_metadata"}


def _meta_like(n: torch.fx.Node) -> dict:
    """The metadata a node inserted after n carries (same value shape, same owning module): dumps read it."""
    return {k: v for k, v in n.meta.items() if k in ("val", "nn_module_stack", "tensor_meta")}


def linear_nodes(gm: GraphModule) -> dict[str, torch.fx.Node]:
    """{linear module path: its aten.linear node}, by the path of the weight the node reads."""
    by_placeholder = param_paths(gm)
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n.target) == "linear" and isinstance(n.args[1], torch.fx.Node):
            w = n.args[1]
            while w.op == "call_function" and w.all_input_nodes:   # a cast of the weight
                w = w.all_input_nodes[0]
            path = by_placeholder.get(w.name)
            if path is not None and path.endswith(".weight"):
                out[path[: -len(".weight")]] = n
    return out


def _smooth_division(gm: GraphModule, x: torch.fx.Node) -> torch.fx.Node | None:
    """x if it is insert_lowrank's division by a `.smooth` buffer, else None."""
    if not (x.op == "call_function" and op_name(x.target) == "div" and len(x.args) == 2
            and isinstance(x.args[1], torch.fx.Node)):
        return None
    return x if param_paths(gm).get(x.args[1].name, "").endswith(".smooth") else None


def gelu_fed(gm: GraphModule) -> set[str]:
    """The linears whose input is the output of a GELU call (aten.gelu, exact or tanh), read through casts, copies,
    the smoothing division and the dcc:: quantization and shift an earlier rewrite put there: Nunchaku quantizes
    such an input unsigned, after adding SHIFT_GELU (GELU >= -0.17 > -SHIFT_GELU)."""
    out = set()
    for path, lin in linear_nodes(gm).items():
        x = lin.args[0]
        while isinstance(x, torch.fx.Node) and x.op == "call_function":
            name = op_name(x.target)
            if ops.is_runtime_numerics(x) or name in _PASS_VALUES or _smooth_division(gm, x) is not None or (
                    name == "add" and x.args[1:] == (w4a4.SHIFT_GELU,)):
                x = x.args[0]
            else:
                break
        if isinstance(x, torch.fx.Node) and x.op == "call_function" and op_name(x.target) == "gelu":
            out.add(path)
    return out


def reads_shifted(gm: GraphModule, path: str) -> bool:
    """Whether linear `path` reads an unsigned dcc::quant_act_int4 node, i.e. its input is shifted (insert_act_quant
    with "uint4") and its bias must take the shift back."""
    lin = linear_nodes(gm).get(path)
    x = None if lin is None else lin.args[0]
    return isinstance(x, torch.fx.Node) and x.target is ops.quant_act_int4 and bool(x.args[2])


def _shifted_input(gm: GraphModule, x: torch.fx.Node) -> torch.fx.Node:
    """x + SHIFT_GELU for an unsigned ("uint4") input, added where the kernel adds it: to the raw 16-bit input,
    before the division by smooth (which insert_lowrank put on the main branch only; the low-rank branch keeps the
    unshifted x)."""
    div = _smooth_division(gm, x)
    raw = x if div is None else div.args[0]
    with gm.graph.inserting_after(x):
        shifted = gm.graph.call_function(torch.ops.aten.add.Tensor, (raw, w4a4.SHIFT_GELU))
    shifted.meta = _meta_like(x)
    if div is None:
        return shifted
    with gm.graph.inserting_after(shifted):
        out = gm.graph.call_function(torch.ops.aten.div.Tensor, (shifted, div.args[1]))
    out.meta = _meta_like(x)
    return out


def insert_act_quant(gm: GraphModule, linears: dict[str, str]) -> int:
    """Quantize the input of each linear (path -> activation format, ops.parse_act: "int8" per token, "int4:dtype"
    per token and 64-group, ...) as the engine does before its GEMM. Linears reading one tensor in one format share
    one quantization node. "uint4" also shifts the input by SHIFT_GELU before its smoothing division; the linear's
    bias must take the shift back (w4a4.shift_compensation: the pass that asks for uint4 folds it). Returns the
    number of quantization nodes inserted."""
    nodes = linear_nodes(gm)
    shared: dict[tuple, torch.fx.Node] = {}
    for name, fmt in linears.items():
        try:
            op, extra = ops.act_op(fmt)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if name not in nodes:
            raise ValueError(f"{name}: no linear node reads {name}.weight in the block's graph")
        lin = nodes[name]
        x = lin.args[0]
        if (x, fmt) not in shared:
            src = _shifted_input(gm, x) if ops.is_shifted(fmt) else x
            with gm.graph.inserting_after(src):
                q = gm.graph.call_function(op, (src, *extra))
            q.meta = _meta_like(x)
            shared[(x, fmt)] = q
        lin.replace_input_with(x, shared[(x, fmt)])
        if not x.users and _smooth_division(gm, x) is not None:   # the unshifted division no one reads now
            gm.graph.erase_node(x)
    if shared:
        changed(gm)
    return len(shared)


def add_linear_bias(gm: GraphModule, path: str) -> None:
    """The linear `path` gained a bias parameter (a pass created `path.bias`): its node reads it from now on."""
    lin = linear_nodes(gm).get(path)
    if lin is None:
        raise ValueError(f"{path}: no linear node reads {path}.weight in the block's graph")
    if len(lin.args) > 2 and lin.args[2] is not None:
        raise ValueError(f"{path}: its linear node already reads a bias")
    b = add_param_input(gm, f"{path}.bias")
    w = lin.args[1].meta.get("val")
    if isinstance(w, torch.Tensor):
        b.meta["val"] = w.new_empty(w.shape[0])
    lin.args = (lin.args[0], lin.args[1], b)
    changed(gm)


def insert_lowrank(gm: GraphModule, path: str) -> None:
    """SVDQuant's linear: y = linear(x / smooth, R) + linear(linear(x, lora_down), lora_up), reading the buffers
    `path.smooth` [K], `path.lora_down` [r, K] and `path.lora_up` [N, r] of the linear module. The main branch reads
    the smoothed input (its weight R is stored times smooth); the 16-bit branch reads the raw x."""
    lin = linear_nodes(gm).get(path)
    if lin is None:
        raise ValueError(f"{path}: no linear node reads {path}.weight in the block's graph")
    x = lin.args[0]
    s, d, u = (add_param_input(gm, f"{path}.{n}", "buffer") for n in ("smooth", "lora_down", "lora_up"))
    keep = {k: v for k, v in lin.meta.items() if k in ("nn_module_stack",)}
    with gm.graph.inserting_before(lin):
        xs = gm.graph.call_function(torch.ops.aten.div.Tensor, (x, s))
    xs.meta = {**keep, "val": x.meta.get("val")}
    lin.replace_input_with(x, xs)
    users = list(lin.users)
    with gm.graph.inserting_after(lin):
        h = gm.graph.call_function(torch.ops.aten.linear.default, (x, d))
    with gm.graph.inserting_after(h):
        b = gm.graph.call_function(torch.ops.aten.linear.default, (h, u))
    with gm.graph.inserting_after(b):
        y = gm.graph.call_function(torch.ops.aten.add.Tensor, (lin, b))
    for n in (h, b, y):
        n.meta = dict(keep)
    y.meta["val"] = lin.meta.get("val")
    for user in users:
        user.replace_input_with(lin, y)
    changed(gm)


def attention_nodes(gm: GraphModule, module: str) -> list[AttentionSite]:
    """The attentions (sdpa nodes or eager softmax attention: ir/attention_sites.py) called inside the block's
    submodule `module` (e.g. "self_attn")."""
    return [site for site in attention_sites(gm) if module in site.module_paths()]


def cache_source(n: torch.fx.Node) -> torch.fx.Node:
    """Walk back from attention's key or value input through the GQA repeat to the tensor an engine caches: the
    earliest node on the way shaped [batch, heads, tokens, head_dim] like the input (after RoPE, before repeat)."""
    val = n.meta["val"]
    b, t, d = val.shape[0], val.shape[-2], val.shape[-1]
    best, m = n, n
    while m.op == "call_function" and op_name(m.target) in _REPEAT and m.all_input_nodes:
        m = m.args[0] if isinstance(m.args[0], torch.fx.Node) else m.all_input_nodes[0]
        v = m.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 4 and (v.shape[0], v.shape[2], v.shape[3]) == (b, t, d):
            best = m
    return best


def kv_nodes(gm: GraphModule, module: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(K, V) as the cache holds them, for the one attention inside `module`."""
    found = attention_nodes(gm, module)
    if len(found) != 1:
        raise ValueError(f"{module}: {len(found)} attention nodes run inside it in the block's graph, expected one")
    return cache_source(found[0].k), cache_source(found[0].v)


def insert_kv_quant(gm: GraphModule, attentions: dict[str, int]) -> int:
    """Quantize K and V (attention module path -> cache bits) where the engine writes its cache: per token and head,
    after RoPE, before the GQA repeat. Returns the number of nodes inserted."""
    count = 0
    for module, bits in attentions.items():
        for src in kv_nodes(gm, module):
            users = list(src.users)
            with gm.graph.inserting_after(src):
                q = gm.graph.call_function(ops.quant_kv, (src, int(bits)))
            q.meta = _meta_like(src)
            for u in users:
                u.replace_input_with(src, q)
            count += 1
    if count:
        changed(gm)
    return count


def call_modules(gm: GraphModule, modules: dict[str, torch.nn.Module]) -> None:
    """Each linear node reading `path.weight` becomes a call of modules[path] (a format's own linear: the CPU
    reference of an integer GEMM, or a GPU kernel), and the weight and bias it no longer reads leave the inputs."""
    nodes = linear_nodes(gm)
    for path, mod in modules.items():
        if path not in nodes:
            raise ValueError(f"{path}: no linear node reads {path}.weight in the block's graph")
        lin = nodes[path]
        gm.add_submodule(path, mod)
        with gm.graph.inserting_after(lin):
            call = gm.graph.call_module(path, (lin.args[0],))
        call.meta = dict(lin.meta)
        lin.replace_all_uses_with(call)
        gm.graph.erase_node(lin)
    gm.graph.eliminate_dead_code()   # the casts of the weights the modules replace
    drop_unused_inputs(gm)
    changed(gm)
