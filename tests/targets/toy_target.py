"""A third target defined in the test folder alone: int8 symmetric per-channel weights stored as `<layer>.q` (int8
[N, K]) and `<layer>.s` (fp16 [N]), decoded as q * s in float32. Importing this module registers it as "toy"."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dcc.compiler.pass_manager import Step
from dcc.ir.formats import QuantSpec
from dcc.passes.rtn import RtnConfig
from dcc.targets.artifact import sha256_tensor
from dcc.targets.base import Format, Target, TargetError, TargetOptions, register_target
from dcc.targets.common.emit import BaseEmitter

FORMAT = "toy-int8-per-channel"


@dataclass(frozen=True)
class ToyOptions(TargetOptions):
    """algo: rtn; bits: 8."""
    algo: str = "rtn"
    bits: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 8:
            raise TargetError(f"--bits {self.bits}: the toy layout stores int8 codes; use --bits 8")


def _decode(tensors, prefix: str, entry: dict) -> torch.Tensor:
    return tensors.get(f"{prefix}.q").to(torch.float32) * tensors.get(f"{prefix}.s").to(torch.float32).view(-1, 1)


class ToyEmitter(BaseEmitter):
    def quantized(self, full, lin, mod, entry):
        qt = lin.qtensor
        self.writer.add(f"{full}.q", qt.codes.to(torch.int8))
        self.writer.add(f"{full}.s", qt.scale.reshape(-1).to(torch.float16))
        entry.update(format=FORMAT, spec=qt.spec.to_dict(), weight_sha256=sha256_tensor(mod.weight.data.float()))


@register_target
class Toy(Target):
    name = "toy"
    engine_name = "Toy"
    summary = "int8 per channel, for the interface test"
    Options = ToyOptions
    algos = {"rtn": "round to nearest"}
    formats = {FORMAT: Format(FORMAT, ("q", "s"), _decode, decoded_dtype=torch.float32)}

    def spec(self, opts):
        return QuantSpec("int8", symmetric=True, group_size=0, scale_dtype="float16")

    def pipeline(self, opts):
        return [Step("rtn", RtnConfig())]

    def assigner(self, opts, spec):
        def assign(block):
            for lin in block.linears.values():
                lin.spec = spec
        return assign

    def preflight(self, lm, spec, opts):
        return []

    def emitter(self, writer, opts):
        return ToyEmitter(writer, torch.float16)

    def hf_config(self, lm, spec, opts, emitter):
        cfg = lm.config.to_dict()
        cfg["dtype"] = "float16"
        cfg["tie_word_embeddings"] = bool(emitter.tied)
        cfg["quantization_config"] = {"quant_method": "toy", "format": FORMAT, "bits": 8}
        return cfg
