"""LoRA files read into one record per adapted module (A, B, alpha, biases), and module names resolved against an
artifact's names. Formats: diffusers/PEFT (`<prefix>.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`,
optional `.alpha`), kohya (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `.diff_b`),
and kohya FLUX LoRAs in BFL naming (double_blocks/single_blocks), converted by diffusers' own
`_convert_kohya_flux_lora_to_diffusers` (diffusers.loaders.lora_conversion_utils; optional). Every tensor of the
file lands in a record or is an error naming it: nothing is dropped silently."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch


class LoraError(ValueError):
    """A LoRA that cannot be merged; the message is one line naming the file, the tensor and the layer."""


# <module>.<role>[.<adapter>].<weight|bias>: PEFT's lora_A/lora_B (also with an adapter name, lora_A.default.weight),
# kohya's lora_down/lora_up; scalars and vectors after the module: alpha, diff_b, and the kinds that are refused
_FACTOR = re.compile(r"^(?P<mod>.+?)\.(?P<role>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?"
                     r"\.(?P<param>weight|bias)$")
_OTHER = re.compile(r"^(?P<mod>.+)\.(?P<role>alpha|diff_b|diff|dora_scale|lora_magnitude_vector(?:\..+)?)$")
_ROLE = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}
_REFUSED = {
    "diff": "a full-weight difference, which cannot go into the low-rank branch without requantizing the layer",
    "dora_scale": "DoRA's magnitude vector, which rescales the whole weight (not a low-rank addition): merging it "
                  "would mean requantizing the layer",
    "lora_magnitude_vector": "DoRA's magnitude vector, which rescales the whole weight (not a low-rank addition): "
                             "merging it would mean requantizing the layer",
}
KNOWN_KEYS = ("<module>.lora_A.weight / .lora_B.weight / .lora_B.bias / .alpha (diffusers, PEFT) or "
              "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha / .diff_b (kohya)")
# prefixes a PEFT/diffusers file puts before the model's own module paths (tried in turn, repeatedly)
DOTTED_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.diffusion_model.", "diffusion_model.")
# kohya: the model part a name starts with; the rest is the module path with "." written "_"
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_")
# modules of a text encoder: never in a transformer's or an LLM's artifact (its own model), so never matched
TEXT_ENCODER = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te_", "lora_te1_", "lora_te2_",
                "lora_te3_")
BFL_FLUX = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")


@dataclass
class LoraModule:
    """The LoRA of one module: out += scale * B (A x) (+ the biases), scale = strength * alpha / rank.

    name: the module as the file names it (dotted, prefixes kept; for kohya the underscore name); kohya: the name
    is underscore-flattened; down A [r, K], up B [N, r]; alpha (None: = rank, scale 1); bias: lora_B's bias, scaled
    like the branch; diff_b: a bias difference, scaled by the strength only; keys: role -> the tensor's key."""
    name: str
    kohya: bool
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    bias: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def scale(self, strength: float) -> float:
        return strength * (1.0 if self.alpha is None or self.rank == 0 else self.alpha / self.rank)

    @property
    def first_key(self) -> str:
        return next(iter(self.keys.values()))


def _as_matrix(t: torch.Tensor, key: str, src: str) -> torch.Tensor:
    """A 2-D factor; a 1x1 convolution's [r, K, 1, 1] is the same matrix."""
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]
    if t.dim() != 2:
        raise LoraError(f"{src}: tensor {key} has shape {tuple(t.shape)}; a LoRA factor is a matrix [rank, in] "
                        f"or [out, rank] (a convolution's LoRA cannot go into a linear's branch)")
    if not t.is_floating_point():
        raise LoraError(f"{src}: tensor {key} is {t.dtype}; LoRA factors are floating point")
    _check_finite(t, key, src)
    return t


def _check_finite(t: torch.Tensor, key: str, src: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise LoraError(f"{src}: tensor {key} has {int((~torch.isfinite(t)).sum())} NaN/inf values")


def parse(sd: dict[str, torch.Tensor], src: str) -> tuple[list[LoraModule], str]:
    """(the modules of a LoRA state dict, its format: "peft", "kohya", "kohya+peft" (both kinds of keys) or
    "kohya-flux (diffusers' converter)")."""
    if not sd:
        raise LoraError(f"{src}: holds no tensors")
    kinds = set()
    if any(k.startswith(BFL_FLUX) for k in sd):
        sd = convert_bfl_flux(sd, src)
        kinds.add("kohya-flux (diffusers' converter)")
    mods: dict[str, LoraModule] = {}
    adapters: set[str] = set()
    for key in sorted(sd):
        t = sd[key]
        m = _FACTOR.match(key)
        if m:
            mod, role, param = m["mod"], _ROLE[m["role"]], m["param"]
            if m["adapter"] is not None:
                adapters.add(m["adapter"])
            if param == "bias" and role == "down":
                raise LoraError(f"{src}: tensor {key}: a bias on LoRA A is not supported (only lora_B's bias, which "
                                f"adds to the layer's bias)")
            role = "bias" if param == "bias" else role
        else:
            m = _OTHER.match(key)
            if not m:
                raise LoraError(f"{src}: tensor {key} is not a LoRA tensor dcc knows (expected {KNOWN_KEYS})")
            mod, role = m["mod"], m["role"].split(".")[0]
            if role in _REFUSED:
                raise LoraError(f"{src}: tensor {key} is {_REFUSED[role]}")
        kohya = "." not in mod and mod.startswith("lora_")
        if not any(k.startswith("kohya-flux") for k in kinds):   # after the converter every key is diffusers'
            kinds.add("kohya" if kohya else "peft")
        rec = mods.setdefault(mod, LoraModule(mod, kohya))
        if role in rec.keys:
            raise LoraError(f"{src}: tensors {rec.keys[role]} and {key} both give the {role} of module {mod}")
        rec.keys[role] = key
        if role in ("down", "up"):
            setattr(rec, role, _as_matrix(t, key, src))
        elif role == "alpha":
            if t.numel() != 1 or not math.isfinite(float(t.reshape(-1)[0])):
                raise LoraError(f"{src}: tensor {key} should be one finite number (alpha), got shape "
                                f"{tuple(t.shape)}")
            rec.alpha = float(t.reshape(-1)[0])
        else:   # bias, diff_b
            if t.dim() != 1 or not t.is_floating_point():
                raise LoraError(f"{src}: tensor {key} should be a 1-D float vector (a bias), got {t.dtype} "
                                f"{tuple(t.shape)}")
            _check_finite(t, key, src)
            setattr(rec, role, t)
    if len(adapters) > 1:
        raise LoraError(f"{src}: holds several PEFT adapters ({', '.join(sorted(adapters))}); merge one file per "
                        f"adapter")
    for rec in mods.values():
        _check_pairs(rec, src)
    return list(mods.values()), "+".join(sorted(kinds))


def _check_pairs(rec: LoraModule, src: str) -> None:
    if (rec.down is None) != (rec.up is None):
        have, miss = ("A (down)", "B (up)") if rec.down is not None else ("B (up)", "A (down)")
        raise LoraError(f"{src}: module {rec.name} has LoRA {have} ({rec.first_key}) but no {miss}")
    if rec.down is None and (rec.alpha is not None or rec.bias is not None):
        raise LoraError(f"{src}: tensor {rec.first_key} belongs to module {rec.name}, which has no LoRA factors")
    if rec.down is not None and rec.up.shape[1] != rec.down.shape[0]:
        raise LoraError(f"{src}: module {rec.name}: {rec.keys['up']} {tuple(rec.up.shape)} and {rec.keys['down']} "
                        f"{tuple(rec.down.shape)} disagree on the rank")
    if rec.bias is not None and rec.up is not None and rec.bias.shape[0] != rec.up.shape[0]:
        raise LoraError(f"{src}: module {rec.name}: {rec.keys['bias']} has {rec.bias.shape[0]} entries but "
                        f"{rec.keys['up']} has {rec.up.shape[0]} rows")


def convert_bfl_flux(sd: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA in BFL naming (lora_unet_double_blocks_0_img_attn_qkv...) -> diffusers names (to_q/to_k/to_v
    with a shared or chunked A, alpha folded into the factors), by diffusers' own converter. Tensors the converter
    would drop (a nonzero diff_b; any key it reports as unsupported) are an error, not a silent loss."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    except ImportError as e:
        raise LoraError(f"{src}: a kohya FLUX LoRA in BFL naming (double_blocks/single_blocks) needs diffusers' "
                        f"converter: pip install 'dcc[diffusers]' ({e})") from None
    for key, t in sd.items():
        if key.endswith(".diff_b") and bool(t.any()):
            raise LoraError(f"{src}: tensor {key} is a nonzero bias difference on a BFL-named module, which diffusers' "
                            f"converter drops; dcc will not drop it silently (convert the file to diffusers names)")
    sd = {k: v for k, v in sd.items() if not k.endswith(".diff_b")}   # all zero (checked above): nothing lost
    dropped: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record):
            if "nsupported keys" in record.getMessage():
                dropped.append(record.getMessage())

    log = logging.getLogger("diffusers.loaders.lora_conversion_utils")
    handler = _Catch(logging.WARNING)
    log.addHandler(handler)
    try:
        out = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    except (ValueError, KeyError, AssertionError) as e:
        raise LoraError(f"{src}: diffusers' kohya FLUX converter refused the file: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from None
    finally:
        log.removeHandler(handler)
    if dropped:
        raise LoraError(f"{src}: diffusers' kohya FLUX converter dropped tensors: {' '.join(dropped[0].split())}")
    return {k: v for k, v in out.items()}


class Resolver:
    """Module names as an artifact knows them; a LoRA's name -> one of them, or None (a module it does not have).

    Dotted names: the name itself, else with the prefixes of DOTTED_PREFIXES stripped. kohya names: the part after
    the kohya prefix against every name with "." written "_", whole or as a trailing run of its components
    (`layers_0_attn_q` finds `model.layers.0.attn.q`); two candidates are an error, never a guess."""

    def __init__(self, names):
        self.names = set(names)
        self.whole: dict[str, set[str]] = {}
        self.tail: dict[str, set[str]] = {}
        for n in self.names:
            parts = n.split(".")
            self.whole.setdefault("_".join(parts), set()).add(n)
            for i in range(1, len(parts)):
                self.tail.setdefault("_".join(parts[i:]), set()).add(n)

    def __call__(self, rec: LoraModule, src: str) -> str | None:
        if rec.name.startswith(TEXT_ENCODER):
            return None
        return self.kohya(rec, src) if rec.kohya else self.dotted(rec.name)

    def dotted(self, name: str) -> str | None:
        seen = [name]
        while True:
            if seen[-1] in self.names:
                return seen[-1]
            nxt = next((seen[-1][len(p):] for p in DOTTED_PREFIXES if seen[-1].startswith(p)), None)
            if nxt is None:
                return None
            seen.append(nxt)

    def kohya(self, rec: LoraModule, src: str) -> str | None:
        rest = next(rec.name[len(p):] for p in KOHYA_PREFIXES if rec.name.startswith(p))
        for table in (self.whole, self.tail):
            found = sorted(table.get(rest, ()))
            if len(found) > 1:
                raise LoraError(f"{src}: tensor {rec.first_key}: the kohya name {rec.name} matches several modules "
                                f"({', '.join(found)}); rename the keys to one of them in diffusers form")
            if found:
                return found[0]
        return None
