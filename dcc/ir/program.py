"""A captured block graph as what runs: torch.export's lifted GraphModule takes the block's parameters and buffers as
inputs, so one capture serves every block of its signature with each block's own tensors bound by path, and a graph
pass's rewrite (a dcc:: op inserted) is what the next forward computes.

A block can run three ways: as the engine computes it (dcc:: run-time numerics on), as the float function the
passes preserve (those ops replaced by their float equivalents: a quantizer passes its input on), and recorded (an fx Interpreter that hands chosen nodes'
values to the caller: a linear's inputs, post-RoPE queries and keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Interpreter

from . import gpu_matmul
from .ops import FLOAT_EQUIVALENT, is_runtime_numerics, passthrough

_IO = "dcc_io"          # GraphModule.meta key: how the graph's placeholders are filled (GraphIO)
_FLOAT = "dcc_float"    # GraphModule.meta key: the cached copy of the graph without run-time numerics


@dataclass(frozen=True)
class GraphIO:
    """Per placeholder, in order: ("param" | "buffer" | "constant" | "input", path or name); and the pytree specs
    of the block's (args, kwargs) and of its output."""
    inputs: tuple[tuple[str, str | None], ...]
    in_spec: Any
    out_spec: Any
    constants: dict


def attach(ep) -> tuple[GraphModule, dict[str, str]]:
    """The ExportedProgram's GraphModule, carrying what it needs to run; and {placeholder name: parameter or buffer
    path} for the analysis."""
    gm = ep.graph_module
    kinds = {"PARAMETER": "param", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant", "CUSTOM_OBJ": "constant",
             "USER_INPUT": "input"}
    inputs, params = [], {}
    for s in ep.graph_signature.input_specs:
        kind = kinds.get(s.kind.name)
        if kind is None:
            raise ValueError(f"captured graph input {s.arg} is of kind {s.kind.name}, which dcc does not run")
        inputs.append((kind, s.target))
        if kind in ("param", "buffer"):
            params[s.arg.name] = s.target
    gm.meta[_IO] = GraphIO(tuple(inputs), ep.call_spec.in_spec, ep.call_spec.out_spec, dict(ep.constants))
    return gm, params


def param_paths(gm: GraphModule) -> dict[str, str]:
    """{placeholder name: parameter or buffer path} of a captured graph."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return {name: target for name, (kind, target) in zip(names, gm.meta[_IO].inputs) if kind in ("param", "buffer")}


def copy_graph(gm: GraphModule) -> GraphModule:
    """An independent copy (its own graph) to rewrite for one block; node names and metadata are kept."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = GraphModule(gm, graph)
    new.meta[_IO] = gm.meta[_IO]
    return new


def drop_unused_inputs(gm: GraphModule) -> None:
    """Remove parameter and buffer placeholders that no node reads any more (after a rewrite bypassed them)."""
    io: GraphIO = gm.meta[_IO]
    keep = []
    for n, spec in zip([n for n in gm.graph.nodes if n.op == "placeholder"], io.inputs):
        if spec[0] in ("param", "buffer") and not n.users:
            gm.graph.erase_node(n)
        else:
            keep.append(spec)
    gm.meta[_IO] = GraphIO(tuple(keep), io.in_spec, io.out_spec, io.constants)


def add_param_input(gm: GraphModule, path: str, kind: str = "param") -> torch.fx.Node:
    """A new placeholder for the module's parameter (kind "param") or buffer ("buffer") `path`, one a pass created,
    after the other parameters and buffers."""
    io: GraphIO = gm.meta[_IO]
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    at = max((i for i, (kind, _) in enumerate(io.inputs) if kind in ("param", "buffer")), default=-1)
    name = "p_" + path.replace(".", "_")
    if at >= 0:
        with gm.graph.inserting_after(places[at]):
            node = gm.graph.placeholder(name)
    else:
        with gm.graph.inserting_before(places[0] if places else None):
            node = gm.graph.placeholder(name)
    gm.meta[_IO] = GraphIO(io.inputs[:at + 1] + ((kind, path),) + io.inputs[at + 1:], io.in_spec, io.out_spec,
                           io.constants)
    return node


def changed(gm: GraphModule) -> None:
    """A rewrite edited gm's graph: lint it, regenerate its code and drop derived copies."""
    gm.graph.lint()
    gm.recompile()
    gm.meta.pop(_FLOAT, None)
    gm.meta.pop("dcc_accessors", None)   # the inputs may have changed


def input_key(args: tuple, kwargs: dict) -> tuple:
    """What a capture is specialised to: the inputs' structure, each tensor's shape, dtype and device, and every
    other value (export bakes Python scalars and None into the graph)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec),) + tuple((tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else repr(v)
                                for v in leaves)


def _accessors(gm: GraphModule, module: torch.nn.Module) -> list:
    """Per placeholder, how to fetch its value: (submodule, attribute) for parameters and buffers (looked up by
    path once per module, read by attribute on every run, so a Parameter a pass replaced is seen), a constant, or
    None for a user input. Cached on the graph for the module last used with it."""
    cached = gm.meta.get("dcc_accessors")
    if cached is not None and cached[0] is module:
        return cached[1]
    io: GraphIO = gm.meta[_IO]
    out = []
    for kind, target in io.inputs:
        if kind in ("param", "buffer"):
            owner, _, attr = target.rpartition(".")
            out.append((module.get_submodule(owner) if owner else module, attr))
        elif kind == "constant":
            out.append(("constant", io.constants[target]))
        else:
            out.append(None)
    gm.meta["dcc_accessors"] = (module, out)
    return out


def _flat_inputs(gm: GraphModule, module: torch.nn.Module, args: tuple, kwargs: dict) -> list:
    io: GraphIO = gm.meta[_IO]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if spec != io.in_spec:
        raise ValueError(f"{type(module).__name__}: called with inputs of another structure than its graph was "
                         f"captured with ({spec} vs {io.in_spec})")
    flat, users = [], iter(leaves)
    for acc in _accessors(gm, module):
        if acc is None:
            flat.append(next(users))
        elif acc[0] == "constant":
            flat.append(acc[1])
        else:
            value = getattr(acc[0], acc[1])
            if value is None:
                raise ValueError(f"{type(module).__name__}: the graph reads {acc[1]} of {type(acc[0]).__name__}, "
                                 f"which is None")
            flat.append(value)
    return flat


def _unflatten(gm: GraphModule, out):
    return pytree.tree_unflatten(list(out), gm.meta[_IO].out_spec)


def float_view(gm: GraphModule) -> GraphModule:
    """gm with every dcc:: run-time numerics op replaced by its float equivalent (a quantizer: its input passed
    on): the float function (cached)."""
    view = gm.meta.get(_FLOAT)
    if view is None:
        view = copy_graph(gm)
        for n in list(view.graph.nodes):
            if is_runtime_numerics(n):
                if FLOAT_EQUIVALENT[n.target] is passthrough:
                    n.replace_all_uses_with(n.args[0])
                    view.graph.erase_node(n)
                else:
                    n.target = FLOAT_EQUIVALENT[n.target]
        view.recompile()
        gm.meta[_FLOAT] = view
    return view


def run(gm: GraphModule, module: torch.nn.Module, args: tuple, kwargs: dict, engine: bool = True):
    """The block's output computed by its graph, with `module`'s current parameters and buffers; engine=False
    bypasses the run-time numerics."""
    g = gm if engine else float_view(gm)
    with gpu_matmul.products():   # float32 products as the compile asked (ir/gpu_matmul.py; fp32 by default)
        return _unflatten(gm, g(*_flat_inputs(gm, module, args, kwargs)))


class _Recorder(Interpreter):
    def __init__(self, gm, engine: bool, watch: dict[str, Callable]):
        super().__init__(gm, garbage_collect_values=True)
        self.engine, self.watch = engine, watch

    def run_node(self, n):
        if not self.engine and is_runtime_numerics(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = FLOAT_EQUIVALENT[n.target](*args, **kwargs)
        else:
            out = super().run_node(n)
        fn = self.watch.get(n.name)
        if fn is not None:
            fn(out)
        return out


def run_recording(gm: GraphModule, module: torch.nn.Module, args: tuple, kwargs: dict,
                  watch: dict[str, Callable[[torch.Tensor], None]], engine: bool = False):
    """Like run, calling watch[node name](value) as each watched node is computed (node by node, so slower)."""
    missing = set(watch) - {n.name for n in gm.graph.nodes}
    if missing:
        raise ValueError(f"graph has no node {sorted(missing)[0]}")
    with gpu_matmul.products():
        out = _Recorder(gm, engine, watch).run(*_flat_inputs(gm, module, args, kwargs), enable_io_processing=False)
    return _unflatten(gm, out)
