"""Capture one block as an fx graph with torch.export (non-strict), and type its nodes for dcc's IR.

Blocks of one class with the same parameter shapes share one capture: the graph depends on the code and the shapes,
not on the weight values, and a Llama layer takes about 0.5 s to export on a CPU."""
from __future__ import annotations

import torch

from .graph import AnalysisError, Node
from .program import attach, input_key, param_paths

_KINDS = {
    "linear": "linear", "layer_norm": "norm", "native_layer_norm": "norm", "rms_norm": "norm", "rsqrt": "norm",
    "scaled_dot_product_attention": "attention", "softmax": "attention", "_softmax": "attention",
    "silu": "activation", "gelu": "activation", "relu": "activation", "tanh": "activation", "sigmoid": "activation",
    "mul": "mul", "add": "add", "embedding": "embedding",
    # dcc:: ops: the engine's run-time numerics (ir/ops.py)
    "quant_act_int8": "runtime", "quant_kv": "runtime", "quant_act_int4": "runtime", "quant_act_nvfp4": "runtime",
}


def op_name(target) -> str:
    """'aten.linear.default' -> 'linear'."""
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def capture(module: torch.nn.Module, args: tuple, kwargs: dict):
    """torch.export the block in eval mode; returns (GraphModule, {placeholder name: parameter path}). The
    GraphModule runs through ir.program (the block's parameters are its inputs)."""
    was_training = module.training
    module.eval()
    try:
        ep = torch.export.export(module, args, kwargs, strict=False)
    except Exception as e:
        raise AnalysisError(f"{type(module).__name__}: torch.export failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    finally:
        module.train(was_training)
    return attach(ep)


class Captures:
    """Captures by what they depend on: the module's signature and the inputs' structure and shapes. Blocks of one
    class and shape share one; a run on another batch size (the first samples of the calibration set) gets its own."""

    def __init__(self):
        self._by_key: dict[tuple, tuple] = {}

    def get(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        key = (signature(module), input_key(args, kwargs))
        if key not in self._by_key:
            self._by_key[key] = capture(module, args, kwargs)
        return self._by_key[key]


def signature(module: torch.nn.Module) -> tuple:
    """What a capture depends on: the module tree, every parameter's name, shape and dtype, and per-layer attention
    variants (e.g. sliding-window layers)."""
    variants = tuple(getattr(m, "attention_type", None) or getattr(m, "sliding_window", None)
                     for m in module.modules())
    return (repr(module), variants) + tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())


def typed_nodes(gm, params: dict[str, str] | None = None) -> list[Node]:
    """The graph's nodes as dcc Nodes (kind, op, inputs, shape, owning module) for dumps and matching."""
    params = param_paths(gm) if params is None else params
    out = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        if n.op == "placeholder":
            kind, target = ("param" if n.name in params else "input"), params.get(n.name, n.name)
        elif n.op == "output":
            kind, target = "output", "output"
        else:
            target = op_name(n.target)
            kind = _KINDS.get(target, "other")
        inputs = [a.name for a in n.all_input_nodes]
        out.append(Node(n.name, kind, target, inputs, shape, dtype, module))
    return out


def first_samples(args: tuple, kwargs: dict, batch: int, n: int) -> tuple[tuple, dict]:
    """Slice every tensor whose first dimension is the batch (hidden states, masks) to its first n rows; tensors
    shared by the batch (RoPE tables with batch 1, positions) stay as they are."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
