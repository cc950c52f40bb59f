"""The Nunchaku target (SVDQuant W4A4 with a 16-bit low-rank branch, research/targets.md 3): its options,
pipelines, spec rule, emitter, config and format, registered under the name "nunchaku".

Nunchaku's engine runs diffusion transformers; for a causal LM (which Nunchaku has no engine for) the artifact holds
Nunchaku's per-layer tensors for dcc's runtime, and the manifest says so."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..base import Format, Target, TargetError, TargetOptions, register_target
from ..common.hf4_config import to_hf4
from .emit import FORMAT, FORMAT_NVFP4, FORMAT_UNSIGNED, TENSORS, TENSORS_NVFP4, NunchakuEmitter, unpack_linear
from .pipeline import ALGOS, GROUP_SIZES, PRECISIONS, make_spec_assigner, pipeline, preflight, weight_spec
from .reference import NunchakuLinear, decode_int4_weight, decode_nvfp4_weight
# diffusers models with a Nunchaku loader: one Nunchaku single file (issue 26 part 3: assign.py, emit_file.py)
from .assign import Plan, make_assigner, make_plan
from .emit_file import NunchakuFileEmitter
from .stored import FORMAT_AWQ, TENSORS_AWQ, check_file, decode_stored


@dataclass(frozen=True)
class NunchakuOptions(TargetOptions):
    """algo: svdquant | svdquant-gptq | smoothquant | rtn; precision: int4 (W4A4, groups of 64; unsigned
    activations after a GELU) or nvfp4 (e2m1 weights and activations with e4m3 scales per 16, a per-tensor weight
    scale); rank: of the 16-bit branch (a multiple of 16); dtype: the 16-bit compute dtype (scales, branch,
    activations), bfloat16 as Nunchaku's FLUX models.

        NunchakuOptions(algo="svdquant", rank=32, precision="nvfp4")
    """
    algo: str = "svdquant"
    dtype: str = "bfloat16"
    precision: str = "int4"
    rank: int = 32
    # FLUX.1 as a Nunchaku single file: "legacy" (the C++ class's names, which the V2 loader reads too) or "v2"
    # (NunchakuFluxTransformer2DModelV2's diffusers names); a recipe option (options: {flux: v2})
    flux: str = "legacy"

    def __post_init__(self):
        super().__post_init__()
        if self.flux not in ("legacy", "v2"):
            raise TargetError(f"flux {self.flux!r}: Nunchaku's FLUX names are 'legacy' (C++ class) or 'v2'")
        if self.bits != 4:
            raise TargetError(f"--bits {self.bits}: Nunchaku's W4A4 layout holds 4-bit weights; use --bits 4")
        if self.precision not in PRECISIONS:
            raise TargetError(f"--precision {self.precision}: dcc writes Nunchaku's {', '.join(PRECISIONS)} "
                              f"checkpoints")
        group = GROUP_SIZES[self.precision]
        if self.group_size not in (None, group):
            raise TargetError(f"--group-size {self.group_size}: Nunchaku's {self.precision.upper()} kernels take "
                              f"groups of {group} only")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 16 or self.rank % 16:
            raise TargetError(f"--rank {self.rank}: the low-rank branch's rank is a multiple of 16 (Nunchaku pads "
                              f"it so), at least 16")


def _decode(tensors, prefix: str, entry: dict) -> torch.Tensor:
    """The main branch the kernel multiplies (codes * scales, in the smoothed basis), exact in float32; NVFP4:
    e2m1 * micro-scale * wtscale * wcscales, in float64 (the first three have at most 2 + 4 + 11 significant bits,
    and dcc writes wcscales of ones, so the float32 result is exact too)."""
    if "stored" in entry:   # a layer of a Nunchaku single file: read through the manifest's mapping
        return decode_stored(tensors, prefix, entry)
    n, k = entry["shape"]
    names = TENSORS_NVFP4 if entry.get("format") == FORMAT_NVFP4 else TENSORS
    t = unpack_linear({name: tensors.get(f"{prefix}.{name}") for name in names}, n, k)
    if "wtscale" not in t:
        return decode_int4_weight(t["codes"], t["scales"]).float()
    w = decode_nvfp4_weight(t["codes"], t["scales"]) * t["wtscale"]
    return (w * t["wcscales"].to(torch.float64).view(-1, 1)).float()


def _reference(tensors: dict, n: int, k: int, bias, unsigned: bool = False) -> NunchakuLinear:
    t = unpack_linear(tensors, n, k)
    if "wtscale" in t:
        return NunchakuLinear("nvfp4", t["codes"], t["scales"], t["smooth"], t["lora_down"], t["lora_up"], t["bias"],
                              wtscale=t["wtscale"], wcscales=t["wcscales"], dtype=t["smooth"].dtype)
    return NunchakuLinear("int4", t["codes"], t["scales"], t["smooth"], t["lora_down"], t["lora_up"], t["bias"],
                          unsigned=unsigned, dtype=t["scales"].dtype)


def _reference_unsigned(tensors: dict, n: int, k: int, bias) -> NunchakuLinear:
    return _reference(tensors, n, k, bias, unsigned=True)


@register_target
class Nunchaku(Target):
    name = "nunchaku"
    engine_name = "Nunchaku"
    summary = ("Nunchaku W4A4 + low-rank branch (SVDQuant: int4 codes and scales per 64, or nvfp4 e2m1 with e4m3 "
               "scales per 16; smooth, lora_down/up)")
    Options = NunchakuOptions
    algos = ALGOS
    formats = {FORMAT: Format(FORMAT, TENSORS, _decode, decoded_dtype=torch.float32, reference=_reference),
               FORMAT_UNSIGNED: Format(FORMAT_UNSIGNED, TENSORS, _decode, decoded_dtype=torch.float32,
                                       reference=_reference_unsigned),
               FORMAT_NVFP4: Format(FORMAT_NVFP4, TENSORS_NVFP4, _decode, decoded_dtype=torch.float32,
                                    reference=_reference),
               # AdaNorm linears of a single file (gemv_awq reconstructs the 16-bit weight: a plain linear is exact)
               FORMAT_AWQ: Format(FORMAT_AWQ, TENSORS_AWQ, decode_stored)}
    cuda_extension = "w4a4"   # csrc/w4a4: INT4 and NVFP4 layers on dcc's W4A4 kernels (cuda.py)

    def spec(self, opts):
        return weight_spec(opts.precision, opts.dtype)

    def pipeline(self, opts):
        return pipeline(opts.algo, opts.rank, opts.precision)

    def for_model(self, lm, opts):
        """A copy of the target holding this compile's plan: Nunchaku's single file (the model's class has a
        Nunchaku loader and every layer it stores in 4 bits fits it) or dcc's runtime (plan.why says why)."""
        bound = copy.copy(self)
        bound.plan = make_plan(lm, opts.precision, opts.rank, opts.flux)
        return bound

    def _plan_of(self) -> Plan:
        return getattr(self, "plan", None) or Plan()   # not bound to a model (a test's assigner): dcc's runtime

    def assigner(self, opts, spec):
        act = f"{opts.precision}:{opts.dtype}"
        return make_assigner(make_spec_assigner(spec, act, opts.unsupported), make_spec_assigner(spec, act, "keep"),
                             opts.dtype, self._plan_of())

    def preflight(self, lm, spec, opts):
        if self._plan_of().active:   # every 4-bit layer of the Nunchaku class was checked; the rest stays 16-bit
            return []
        return preflight(lm, opts.unsupported, opts.precision)

    def emitter(self, writer, opts):
        plan = self._plan_of()
        if plan.active:
            return NunchakuFileEmitter(writer, getattr(torch, opts.dtype), plan, opts.precision, opts.rank)
        emitter = NunchakuEmitter(writer, getattr(torch, opts.dtype))
        emitter.nunchaku_why = plan.why   # why no Nunchaku file (manifest runtime)
        return emitter

    def engines(self, spec, emitter):
        if isinstance(emitter, NunchakuFileEmitter):
            return ["nunchaku", "dcc-runtime"]
        return ["dcc-runtime"]   # Nunchaku's engine runs diffusion transformers, not causal LMs

    def check_artifact(self, art):
        return check_file(art)   # Nunchaku's loader, for a single-file artifact; None (no check) otherwise

    def read_back(self, art):
        from .read_back import read_back   # the single file under the source model's names; None: dcc-named
        return read_back(art)

    def runtime(self, opts, emitter) -> dict:
        group = GROUP_SIZES[opts.precision]
        scales = "e4m3" if opts.precision == "nvfp4" else f"{opts.dtype}"
        unsigned = sorted(k for k, v in emitter.layers.items() if v.get("format") == FORMAT_UNSIGNED)
        out = {"activations": f"{opts.precision} per token and {group}-group ({scales} scales)"
                              + (f"; unsigned after GELU (shift 0.171875) in {len(unsigned)} layers" if unsigned
                                 else ""),
               "kv_bits": None, "kv_cache": {}}
        if isinstance(emitter, NunchakuFileEmitter):
            out["nunchaku_file"] = emitter.summary()
        elif getattr(emitter, "nunchaku_why", None):
            out["nunchaku_file"] = {"written": False, "why": emitter.nunchaku_why}
        return out

    def hf_config(self, lm, spec, opts, emitter) -> dict:
        cfg = to_hf4(lm.config.to_dict(), opts.dtype)
        cfg["tie_word_embeddings"] = bool(emitter.tied)
        if opts.precision == "nvfp4":   # Nunchaku's own quantization_config spelling (research/nunchaku_2026.md B.1)
            weight = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
        else:
            weight = {"dtype": "int4", "group_size": GROUP_SIZES["int4"]}
        cfg["quantization_config"] = {
            "quant_method": "svdquant", "format": FORMAT_NVFP4 if opts.precision == "nvfp4" else FORMAT,
            "producer": "dcc", "weight": weight, "rank": opts.rank,
            "modules_in_16bit": sorted(k for k, v in emitter.layers.items() if "skip_reason" in v),
        }
        return cfg

    def cuda_model(self, art, device="cuda"):
        from .cuda import build_nunchaku_cuda_model
        return build_nunchaku_cuda_model(art, device)

    def check_exact_cuda(self, art, device="cuda", kernels=None):
        """Decoded weights equal the compile-time ones (check_exact), and each layer's GPU output equals the CPU
        emulation of the kernels (cuda.check_layers_cuda) bit for bit."""
        from ...runtime.validate import check_exact
        from .cuda import check_layers_cuda
        exact, k = check_exact(art), check_layers_cuda(art, device)
        if kernels is not None:
            kernels.update(k)
        return {name: ok and k.get(name, {"ok": True})["ok"] for name, ok in exact.items()}
