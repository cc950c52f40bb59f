"""The artifact's model runs each block as its captured graph, the graph the compiler calibrated: the engine's KV cache
quantization (the manifest's runtime.kv_cache) is a dcc:: op in it, and each format linear (the CPU reference of an
integer GEMM, or a GPU kernel) is called as a module where the float graph has aten.linear.

Capture is lazy (the graph is specialised to the inputs' shapes): the first call of a block with a new input shape
exports it, with every format linear stood in for by a plain nn.Linear of the same shape, and later calls reuse it."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..ir import program
from ..ir.capture import Captures
from ..ir.program import copy_graph, input_key
from ..ir.rewrite import call_modules, insert_kv_quant, linear_nodes
from ..ir.rewrite_split import split_concat_linear
from ..models.loader import find_blocks


def _format_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """The linears that are a format's own module (a subclass of nn.Linear), by path inside the block."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear}


class GraphForward:
    """A block's forward replaced by its graph (one per input shape); the module keeps its parameters and paths."""

    def __init__(self, module: nn.Module, kv: dict[str, int], captures: Captures, splits: tuple[str, ...] = ()):
        self.module, self.kv, self.captures, self.splits = module, kv, captures, tuple(splits)
        self.graphs: dict[tuple, torch.fx.GraphModule] = {}
        self.on_linear: Callable[[str, torch.Tensor], None] | None = None   # fn(path in the block, output)

    def __call__(self, *args, **kwargs):
        key = input_key(args, kwargs)
        gm = self.graphs.get(key)
        if gm is None:
            gm = self.graphs[key] = self._capture(args, kwargs)
        if self.on_linear is None:
            return program.run(gm, self.module, args, kwargs)
        # a linear is an aten.linear node (16-bit layers) or a call of the format's module
        nodes = {n.name: path for path, n in linear_nodes(gm).items()}
        nodes.update({n.name: n.target for n in gm.graph.nodes if n.op == "call_module"})
        watch = {name: (lambda v, path=path: self.on_linear(path, v)) for name, path in nodes.items()}
        return program.run_recording(gm, self.module, args, kwargs, watch, engine=True)

    def _capture(self, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        formats = _format_linears(self.module)
        ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
        saved_forward = self.module.__dict__.pop("forward")   # export calls the class's forward
        try:
            # export needs only shapes, but on the inputs' device: empty plain linears stand in for format linears
            for path, m in formats.items():
                stand_in = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                     device=ref.device if ref is not None else "cpu",
                                     dtype=ref.dtype if ref is not None else torch.float32)
                self.module.set_submodule(path, stand_in)
            gm, _ = self.captures.get(self.module, args, kwargs)
        finally:
            for path, m in formats.items():
                self.module.set_submodule(path, m)
            self.module.forward = saved_forward
        gm = copy_graph(gm)
        for path in self.splits:   # the compile's split of a concatenation-fed linear (its parts are modules here)
            split_concat_linear(gm, path)
        if formats:
            call_modules(gm, formats)
        if self.kv:
            insert_kv_quant(gm, self.kv)
        return gm


def run_blocks_as_graphs(model: nn.Module, kv: dict[str, int], block_lists: list[str] | None = None,
                         splits: dict | None = None) -> None:
    """Route every block of `model` through its graph, with KV cache quantization on the attentions `kv` names
    (module path in the model -> bits). The blocks: those of every ModuleList `block_lists` names (a diffusion
    model's, as its manifest records them), else the one list find_blocks finds (a transformers model). `splits`
    ({linear path in the model: its parts}, targets.base.ReadBack.splits): linears whose graph the compile split by
    input columns (ir/rewrite_split.py), which each capture splits again."""
    splits = dict(splits or {})
    lists = ([find_blocks(model)] if block_lists is None
             else [(name, model.get_submodule(name)) for name in block_lists])
    captures = Captures()
    left = dict(kv)
    for prefix, blocks in lists:
        for i, block in enumerate(blocks):
            here = f"{prefix}.{i}." if prefix else f"{i}."
            mine = {p[len(here):]: b for p, b in kv.items() if p.startswith(here)}
            for p in mine:
                left.pop(here + p)
            split = tuple(p[len(here):] for p in sorted(splits) if p.startswith(here))
            for p in split:
                splits.pop(here + p)
            block.forward = GraphForward(block, mine, captures, split)
    if splits:
        raise ValueError(f"split linear {sorted(splits)[0]} is not inside a block of {type(model).__name__}")
    if left:
        raise ValueError(f"KV cache entry {sorted(left)[0]} is not inside a block of {type(model).__name__}")


@contextlib.contextmanager
def linear_outputs(model: nn.Module):
    """A dict filled with every linear's output (module path in the model -> tensor) while the model runs: read off
    the graph inside blocks that run as graphs (module hooks do not fire for aten.linear nodes, and do fire, on fake
    tensors, while a block is being captured), by forward hooks elsewhere."""
    outs: dict[str, torch.Tensor] = {}
    graphs = {name: m.forward for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"),
                                                                                GraphForward)}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(name.startswith(g + ".") for g in graphs):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o.detach())))
    for name, fwd in graphs.items():
        fwd.on_linear = lambda path, v, name=name: outs.__setitem__(f"{name}.{path}", v.detach())
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()
        for fwd in graphs.values():
            fwd.on_linear = None
