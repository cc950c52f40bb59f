"""The pass contract: a frozen, dict-round-tripping config, `run(block, config, ctx) -> PassResult`, a registry keyed by
the pass's file name (also its recipe and CLI token), and `requires`/`ensures` facts checked between passes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch


@dataclass(frozen=True)
class PassConfig:
    """Base of pass configs: typed fields, validated in __post_init__, round-trip through plain dicts."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None):
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
        for k, v in list(d.items()):
            typ = names[k].type
            if isinstance(v, dict) and "QuantSpec" in str(typ):
                from ..ir.formats import QuantSpec
                d[k] = QuantSpec.from_dict(v)
        return cls(**d)


@dataclass
class PassResult:
    """What a pass did to one block: whether weights changed, a one-line summary and per-layer details."""
    changed: bool
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    facts: tuple[str, ...] = ()   # facts established (checked against later passes' `requires`)
    keep_activations: bool = False   # the pass updated the cached calibration inputs itself (exact rescaling)


class Context(Protocol):
    """What the compiler gives a pass (see dcc.compiler.context.BlockContext)."""
    device: torch.device
    seed: int

    def inputs(self, linear: str) -> torch.Tensor: ...          # [tokens, in_features] float32 inputs of a linear
    def block_io(self) -> tuple[tuple, dict, torch.Tensor]: ... # (args, kwargs, float outputs) of the block
    def log(self, msg: str) -> None: ...


class Pass:
    """Subclasses set Config and implement run(); `model_prologue`/`model_epilogue` touch parts outside blocks."""
    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()   # facts that earlier passes must have established
    ensures: ClassVar[tuple[str, ...]] = ()
    forbids: ClassVar[tuple[str, ...]] = ()    # facts that must not hold yet: this pass comes before their passes
    uses_activations: ClassVar[bool] = False
    # the block's float function is unchanged by the pass: the pass manager checks it on a probe batch (when the
    # config's verify is on, and always under --debug), so no pass carries its own check
    preserves_function: ClassVar[bool] = False

    def run(self, block, config, ctx) -> PassResult:
        raise NotImplementedError

    def prepare(self, block, config, ctx) -> None:
        """Called for every step before the block's first pass: a pass may ask the context to read statistics off
        the runs earlier passes make anyway (ctx.track)."""

    def preservation_reference(self, block, config, ctx) -> torch.Tensor:
        """What the block must compute after this pass on the probe samples (taken before it runs): by default
        its output now. A pass that changes the block's input basis (rotate) says what that output becomes."""
        from ._model_parts import call_block
        return call_block(block, ctx)

    def model_prologue(self, model, config, ctx) -> PassResult | None:
        """Runs once before the first block (e.g. rotate the embeddings). model: dcc.compiler.ModelHandle."""
        return None

    def model_epilogue(self, model, config, ctx) -> PassResult | None:
        """Runs once after the last block (e.g. fold the final norm into the head)."""
        return None


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Register a pass under its module's file name: dcc/passes/gptq.py -> 'gptq'."""
    name = cls.__module__.rsplit(".", 1)[-1]
    cls.name = name
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"pass {name!r} registered twice")
    REGISTRY[name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    from . import load_all
    load_all()
    if name not in REGISTRY:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def quantizable(block, names=None):
    """The block's linears that carry a spec (quantize passes act on these), in graph order."""
    return [l for n, l in block.linears.items() if l.spec is not None and (names is None or n in names)]
