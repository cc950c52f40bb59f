"""dcc's IR: one Block per repeated module, holding its torch.export fx graph, typed nodes, and the dataflow groups
(norm -> linears, v -> o, up -> down, residual stream) that passes act on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .formats import QuantizedTensor, QuantSpec


class AnalysisError(ValueError):
    """A structure the dataflow analysis cannot place; the message names the block and the node."""


@dataclass
class Node:
    """One op of a block's graph, typed for dumps and for pattern matching."""
    name: str
    # linear | norm | attention | activation | mul | add | embedding | runtime (a dcc:: op) | input | output | other
    kind: str
    target: str          # the ATen op (or placeholder/output)
    inputs: list[str]
    shape: tuple | None = None
    dtype: str | None = None
    module: str = ""     # owning module path inside the block (from nn_module_stack)


@dataclass
class Linear:
    """A Linear layer of a block, and what the passes did to it."""
    name: str                       # module path inside the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    has_bias: bool
    spec: QuantSpec | None = None   # what quantize passes target (None: keep in float)
    qtensor: QuantizedTensor | None = None
    skip_reason: str | None = None  # why it stays in float, said in dumps and the manifest
    act: str | None = None          # run-time input quantization the engine applies ("int8": per token)
    # the engine's fused layer it is stored in (Nunchaku's qkv_proj): passes that share a factor between linears
    # reading one tensor (svd_lowrank's smoothing and branch) share it only within one group; None: by input alone
    group: str | None = None
    # range ratios the quantizer applies (clip pass): a tensor broadcastable to the scales' [N, G] (or [N, G, 2]: a
    # (min, max) pair for asymmetric formats), ratios in (0, 1]; None: the full [min, max] (ir.formats.compute_qparams)
    clip: Any = None
    stats: dict[str, Any] = field(default_factory=dict)   # measurements for dumps and the manifest (plain numbers)


@dataclass
class NormGroup:
    """A normalisation whose output feeds some linears (smoothing/fusion producer)."""
    norm: str                 # module path of the norm
    kind: str                 # "rms" | "layer"
    weight: str | None        # parameter path of the gain
    bias: str | None          # parameter path of the bias (LayerNorm)
    offset: float             # gain used as (offset + weight): 1.0 for Gemma-style norms
    linears: list[str]
    # the norm's output reaches nothing but these linears; False where something else reads it too (the residual add
    # of a post-norm block, BERT), so a scale folded into the norm would change that reader's input as well
    exclusive: bool = True


@dataclass
class Attention:
    """q/k/v -> attention -> o, with head geometry read from the captured shapes."""
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool                # q/k pass through a rotary embedding before attention
    q_node: str               # graph node feeding attention's query (after RoPE)
    k_node: str
    kv_bits: int | None = None    # the engine's KV cache precision (per token and head, after RoPE), None: 16-bit
    module: str = ""          # the module that calls attention, from the graph ("" where unknown)

    @property
    def path(self) -> str:
        """The attention module: the one the graph says calls attention, else the q linear's parent
        ('self_attn.q_proj' -> 'self_attn'; a split fused projection 'self_attn.qkv_proj.0' needs the former)."""
        return self.module or self.q.rpartition(".")[0]


@dataclass
class MLP:
    """up (and gate) -> activation (* up) -> down."""
    ups: list[str]            # linears whose output reaches down linearly (the "up" side; smoothable producers)
    gate: str | None          # linear whose output passes through the activation (gated MLPs)
    down: str
    act: str                  # activation op name
    smoothable: bool          # scaling the ups' rows by s and down's columns by 1/s preserves the function


@dataclass
class Residual:
    writers: list[str]        # linears whose output is added into the residual stream
    readers: list[str]        # norms reading the residual stream


@dataclass
class Block:
    """One repeated unit (a decoder layer, a transformer block) with its graph and groups."""
    index: int
    prefix: str                                   # module path in the model, e.g. "model.layers.3"
    module: torch.nn.Module
    gm: Any = None                                # torch.fx.GraphModule from torch.export: what runs (ir.program)
    # the graph rewrites applied to gm, in order (each fn(gm)), replayed on the block's other captures (another
    # batch size) so that every run of the block computes the same graph
    rewrites: list = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    linears: dict[str, Linear] = field(default_factory=dict)
    norms: list[NormGroup] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    mlps: list[MLP] = field(default_factory=list)
    residual: Residual | None = None
    # linears reading the block's input as it arrives (post-norm blocks, BERT: the norm that produced it ran at the
    # end of the previous block, so no scale can be folded into a producer inside this block)
    input_readers: list[str] = field(default_factory=list)
    # fused linears split from the dataflow (ir/fused_linear.py): {path in the block: the widths of its parts}
    splits: dict = field(default_factory=dict)

    def linear_module(self, name: str) -> torch.nn.Linear:
        return self.module.get_submodule(name)

    def param(self, path: str) -> torch.nn.Parameter:
        mod, _, attr = path.rpartition(".")
        return getattr(self.module.get_submodule(mod) if mod else self.module, attr)

    def norm_of(self, linear: str) -> NormGroup | None:
        return next((g for g in self.norms if linear in g.linears), None)
