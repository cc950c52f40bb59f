"""The Target interface and its registry. A target is one engine's checkpoint layout: its options, its pass pipelines,
its spec rule and preflight, its emitter, and its formats (the tensors it writes, how they decode, the CPU reference
linear, the CUDA linear, the engine loader's checks). The compiler, the runtime and the CLI reach a target only
through this registry, so adding an engine means adding one folder and registering it.

    @register_target
    class MyTarget(Target):
        name = "mine"
        Options = MyOptions
        ...
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from . import BUILTIN_TARGETS


class TargetError(ValueError):
    """An unknown target or format, or an option a target does not take; the message names it."""


@dataclass(frozen=True)
class TargetOptions:
    """What every target takes; a target subclasses it with its own fields and checks (in __post_init__). Field
    names are the CLI's option names (group_size <-> --group-size)."""
    algo: str = ""
    bits: int = 4
    group_size: int | None = None     # None: the target's default
    dtype: str = "float16"            # scales and the tensors kept in 16 bits
    unsupported: str = "error"        # layers the layout cannot take: "error" or "keep" (16-bit)

    def __post_init__(self):
        if self.unsupported not in ("error", "keep"):
            raise TargetError(f"--unsupported {self.unsupported}: use error or keep")
        if self.dtype not in ("float16", "bfloat16"):
            raise TargetError(f"--dtype {self.dtype}: use float16 or bfloat16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TargetOptions":
        return cls(**(d or {}))


@dataclass(frozen=True)
class Format:
    """One stored weight format of a target: the tensors of a quantized linear (suffixes after the layer name) and
    how the runtime reads them.

    decode(tensors, layer, entry) -> the [N, K] weight the engine's kernel stands for (what validate compares with
    the compile-time checksum); decoded_dtype: the dtype of that checksum (None: the artifact's 16-bit dtype);
    reference(tensors, n, k, bias) -> the CPU reference module of the layer, or None where an nn.Linear holding the
    decoded weight computes exactly what the engine computes."""
    name: str
    tensors: tuple[str, ...]
    decode: Callable
    decoded_dtype: torch.dtype | None = None
    reference: Callable | None = None


@dataclass
class ReadBack:
    """An artifact's layers read back under the source model's names, for a runtime that rebuilds the source model
    (Target.read_back), where the target's file names, fuses or splits them (a Nunchaku single file).

    tensors: {source parameter name: tensor} for every parameter outside `modules` -- 16-bit ones with the engine's
        renames and row orders undone, and the decoded weight (and bias) of a quantized layer whose kernel computes
        with a reconstructed 16-bit weight (a plain linear on it is the reference);
    modules: {dcc linear path: module} -- the reference of each layer whose kernel does not (an nn.Linear subclass
        computing exactly the engine's output rows of that layer);
    splits: {source linear path: [dcc linear paths]} -- linears the compile split by input columns
        (ir/rewrite_split.py): the block graph calls the parts instead, so the source linear's own parameters are
        read by nothing (the runtime fills them with zeros);
    optional: names in `tensors` that the source model may lack (e.g. a zero bias the engine stores always)."""
    tensors: dict
    modules: dict = dataclasses.field(default_factory=dict)
    splits: dict = dataclasses.field(default_factory=dict)
    optional: set = dataclasses.field(default_factory=set)


class Target:
    """One engine's layout. Subclasses set the class attributes and implement the compile-side methods; the runtime
    side (formats, loader checks, CUDA) has defaults for targets that have none."""
    name: ClassVar[str]
    engine_name: ClassVar[str]                     # the engine as users know it ("TinyChat"), for messages
    summary: ClassVar[str]                         # one line for `dcc compile --help`
    Options: ClassVar[type[TargetOptions]]
    algos: ClassVar[dict[str, str]]                # algorithm -> what it runs (for --help); the first is the default
    formats: ClassVar[dict[str, Format]] = {}
    cuda_extension: ClassVar[str | None] = None    # the CUDA runtime that executes its artifacts, if any

    # ---------------------------------------------------------------------------------------------- options
    def options(self, **given) -> TargetOptions:
        """The target's options from the values a user gave (None: not given). A value for an option this target
        does not have is an error naming it."""
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(k for k, v in given.items() if v is not None and k not in fields)
        if unknown:
            flag = "--" + unknown[0].replace("_", "-")
            raise TargetError(f"{flag}: target {self.name} has no such option (it takes "
                              f"{', '.join('--' + f.replace('_', '-') for f in sorted(fields))})")
        kw = {k: v for k, v in given.items() if v is not None and k in fields}
        kw.setdefault("algo", next(iter(self.algos)))
        if kw["algo"] not in self.algos:
            raise TargetError(f"--algo {kw['algo']}: not an algorithm of target {self.name} "
                              f"({', '.join(self.algos)})")
        return self.Options(**kw)

    # ---------------------------------------------------------------------------------------------- compile side
    def spec(self, opts):
        """The weight QuantSpec the options ask for (raises naming the option if the layout cannot take it)."""
        raise NotImplementedError

    def pipeline(self, opts) -> list:
        """The passes run on every block, in order (a literal list per algorithm in the target's pipeline.py)."""
        raise NotImplementedError

    def for_model(self, lm, opts) -> "Target":
        """The target for one compile of `lm`: itself, or, for a target whose choices depend on the model (the
        Nunchaku single file's plan), a fresh instance holding them -- never per-compile state on the registry's
        instance. The compiler calls it once, before assigner, preflight and emitter."""
        return self

    def assigner(self, opts, spec) -> Callable:
        """assign(block): sets each Linear's spec (or skip reason) and the run-time numerics the engine applies."""
        raise NotImplementedError

    def preflight(self, lm, spec, opts) -> list[str]:
        """Check every linear of the model against the layout before any work; the reasons of layers kept 16-bit."""
        raise NotImplementedError

    def emitter(self, writer, opts):
        """The object whose on_block(block, ctx) and finish(lm) write the target's tensors into `writer`."""
        raise NotImplementedError

    def engines(self, spec, emitter) -> list[str]:
        """Who loads the artifact (the engine, dcc's runtime)."""
        return ["dcc-runtime"]

    def hf_config(self, lm, spec, opts, emitter) -> dict:
        """config.json of the artifact: the source config plus the target's quantization_config."""
        raise NotImplementedError

    def runtime(self, opts, emitter) -> dict:
        """The engine's run-time numerics the artifact was evaluated under (recorded in the manifest)."""
        return {"activations": None, "kv_bits": None, "kv_cache": {}}

    # ---------------------------------------------------------------------------------------------- runtime side
    def check_artifact(self, art) -> list[str] | None:
        """Problems the engine's own loader would have with the artifact (one line each); [] if it loads; None
        where the target has no model of its engine's loader."""
        return None

    def read_back(self, art) -> ReadBack | None:
        """The artifact's layers under the source model's names (ReadBack), for the CPU reference; None where they
        are stored so already (a dcc-named artifact: the runtime reads art.tensors and the formats directly)."""
        return None

    def prepare_reference(self, model, art) -> None:
        """Called on the CPU reference model of a dcc-named artifact once its layers are filled, before it first
        runs: where the engine fuses an op with its activation quantization (QServe's norm + quant), the target puts
        the engine's own numerics in. Default: nothing."""

    def fast_decoder(self):
        """This target's part of `dcc generate`'s fast decoder (dcc/runtime/fastlm/kinds.py: FastKind), or None
        where it has none (generate then runs the artifact's model)."""
        return None

    def cuda_model(self, art, device: str = "cuda"):
        raise TargetError(f"target {self.name} has no CUDA runtime; use --device cpu")

    def check_exact_cuda(self, art, device: str = "cuda", kernels: dict | None = None) -> dict[str, bool]:
        raise TargetError(f"target {self.name} has no CUDA runtime; use --device cpu")


_REGISTRY: dict[str, Target] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: make the target available to the compiler, the runtime and the CLI under cls.name."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise TargetError(f"target {cls.name!r} registered twice ({type(_REGISTRY[cls.name]).__module__} and "
                          f"{cls.__module__})")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    for name in BUILTIN_TARGETS:
        importlib.import_module(f"{__package__}.{name}")


def targets() -> dict[str, Target]:
    """Every registered target, by name: the built-in ones first, in the registry line's order."""
    _load_builtin()
    order = [n for n in BUILTIN_TARGETS if n in _REGISTRY] + [n for n in _REGISTRY if n not in BUILTIN_TARGETS]
    return {n: _REGISTRY[n] for n in order}


def get_target(name: str) -> Target:
    reg = targets()
    if name not in reg:
        raise TargetError(f"unknown target {name!r}; available: {', '.join(reg)}")
    return reg[name]


def get_format(fmt: str) -> tuple[Target, Format]:
    """The target that writes format `fmt`, and the format."""
    for t in targets().values():
        if fmt in t.formats:
            return t, t.formats[fmt]
    raise TargetError(f"format {fmt!r} belongs to no registered target")
