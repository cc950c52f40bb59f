"""Quantization formats: integer (int2..int8, sym/asym) and small floats (fp8 e4m3fn/e5m2, fp4 e2m1), with
per-group/channel/tensor scales -- or two levels, fp8 micro-scales per group under one 16-bit per-tensor scale (NVFP4)
-- the exact quantize/dequantize rules the targets use, and error metrics."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import progressive
from .fp_formats import FP_DTYPES, _fmt, fp_decode, fp_encode, round_to_fp  # noqa: F401  (re-exported)

INT_DTYPES = {f"int{b}" for b in range(2, 9)}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ZERO_MODES = {"integer", "scaled", "float", "offset"}
_SCALE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class QuantSpec:
    dtype: str = "int4"
    symmetric: bool = False
    group_size: int = 128
    scale_dtype: str = "float16"
    zero_mode: str = "integer"
    progressive: bool = False   # QoQ two levels: int8 per channel (fp16 scale), then these groups (int8 scale/zero)
    # fp two levels (NVFP4): the group scales are themselves stored in this fp8 format ("fp8_e4m3"), under one
    # per-tensor scale in scale_dtype; None: one scale per group in scale_dtype
    micro_scale: str | None = None

    def __post_init__(self):
        if self.dtype not in INT_DTYPES | FP_DTYPES:
            raise ValueError(f"QuantSpec.dtype {self.dtype!r} is not one of {sorted(INT_DTYPES | FP_DTYPES)}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise ValueError(f"QuantSpec.group_size must be an int > 0 (group), 0 (per channel) or -1 (per tensor), "
                             f"got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype {self.scale_dtype!r} is not one of {sorted(SCALE_DTYPES)}")
        if self.zero_mode not in ZERO_MODES:
            raise ValueError(f"QuantSpec.zero_mode {self.zero_mode!r} is not one of {sorted(ZERO_MODES)}")
        if not isinstance(self.progressive, bool):
            raise ValueError(f"QuantSpec.progressive must be a bool, got {self.progressive!r}")
        if self.progressive and (self.is_fp or self.symmetric or self.bits > 4 or self.group_size <= 0
                                 or self.zero_mode != "integer"):
            raise ValueError("QuantSpec.progressive needs an asymmetric int2..int4 dtype with groups (group_size > 0) "
                             "and zero_mode 'integer' (the level-1 zero is an int8)")
        if self.micro_scale is not None and (self.micro_scale not in ("fp8_e4m3", "fp8_e5m2")
                                             or self.dtype not in FP_DTYPES or self.group_size <= 0):
            raise ValueError(f"QuantSpec.micro_scale {self.micro_scale!r}: two-level scales need 'fp8_e4m3' or "
                             f"'fp8_e5m2' micro-scales, an fp element dtype and groups (group_size > 0)")
        if self.is_fp and not self.symmetric:  # fp formats have no zero point: normalise so equal specs compare equal
            object.__setattr__(self, "symmetric", True)

    @property
    def is_fp(self) -> bool:
        return self.dtype in FP_DTYPES

    @property
    def bits(self) -> int:
        return _fmt(self.dtype).nbits if self.is_fp else int(self.dtype[3:])

    @property
    def qmax(self):
        """Largest code (int: signed restricted range if symmetric, else unsigned); fp: largest finite value."""
        if self.is_fp:
            return _fmt(self.dtype).max
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def qmin(self):
        return -self.qmax if self.symmetric else 0

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["micro_scale"] is None:   # the one-level specs keep the dict (and the manifests) they always had
            del d["micro_scale"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s) {sorted(unknown)}")
        return cls(**d)

    def num_groups(self, in_features: int) -> int:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if self.group_size <= 0:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {in_features}")
        return in_features // self.group_size

    def short(self) -> str:
        if self.is_fp:
            parts = [self.dtype]
        elif self.symmetric:
            parts = [self.dtype, "sym"]
        else:
            parts = ["u" + self.dtype, "asym"] + ({"scaled": ["scaled-zero"], "float": ["float-zero"],
                                                   "offset": ["float-zero"]}.get(self.zero_mode, []))
        if self.progressive:
            parts = ["u" + self.dtype, "progressive (int8 per-channel, then"]
            return " ".join(parts + [f"g{self.group_size} int8 scale/zero)", _SCALE_SHORT[self.scale_dtype]])
        gran = {0: "per-channel", -1: "per-tensor"}.get(self.group_size, f"g{self.group_size}")
        if self.micro_scale is not None:
            return " ".join(parts + [gran, self.micro_scale[4:], "x", _SCALE_SHORT[self.scale_dtype], "per-tensor"])
        return " ".join(parts + [gran, _SCALE_SHORT[self.scale_dtype]])


# ------------------------------------------------------------------------------------------- integer / scales

def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[N, K] -> [N, G, gs]; per-channel and per-tensor both use G = 1 (a [1, 1] scale broadcasts over rows)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = spec.num_groups(k)
    return w.reshape(n, g, k // g)


def _scale_shape(w: torch.Tensor, spec: QuantSpec) -> tuple[int, int]:
    return (1, 1) if spec.group_size == -1 else (w.shape[0], spec.num_groups(w.shape[1]))


def compute_qparams(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [N, G] (in spec.scale_dtype; [1, 1] per tensor) and, for asymmetric int, int16 zero points [N, G].

    clip shrinks the range (scalar or tensor broadcastable to [N, G]). Statistics are computed in float32 and the
    scale is rounded (RNE) to scale_dtype before the zero point is derived, so codes match what the kernel sees.
    A zero range (all-zero group) gets scale 1: the group quantizes to the zero code and dequantizes to exactly 0.
    A nonzero scale that underflows scale_dtype becomes its smallest subnormal instead (codes stay in range since
    the true scale is below half of it), so tiny groups keep a coarse approximation rather than collapsing to 0.
    """
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if spec.progressive:
        raise ValueError("a progressive spec has two scale levels: use progressive_qparams")
    if spec.micro_scale is not None:
        raise ValueError("a micro-scaled spec has two scale levels: use two_level_qparams")
    shape = _scale_shape(w, spec)
    g = _grouped(w.detach().to(torch.float32), spec)
    if spec.group_size == -1:
        g = g.reshape(1, 1, -1)
    c_lo, c_hi = _clip_pair(clip, shape, spec, w.device)
    if spec.symmetric:  # int sym and all fp formats
        s = g.abs().amax(-1) * c_hi / spec.qmax
        lo = None
    elif spec.zero_mode in ("float", "offset"):
        # float zero (Q4_1 / TinyChat's free scaled_zeros): the grid spans [min, max] itself, shrunk toward the
        # middle by the clip ratios; the zero is the grid's first level, a value in scale_dtype
        lo, hi = g.amin(-1), g.amax(-1)
        mid = (lo + hi) / 2
        lo, hi = mid - (mid - lo) * c_lo, mid + (hi - mid) * c_hi
        s = (hi - lo) / spec.qmax
    else:  # the range always includes 0 so that 0 is exactly representable (padding, pruned weights)
        lo = g.amin(-1).clamp(max=0) * c_lo
        hi = g.amax(-1).clamp(min=0) * c_hi
        s = (hi - lo) / spec.qmax
    s32, s = s, s.to(spec.torch_scale_dtype)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"non-finite scale (NaN/inf weights, or the range overflows {spec.scale_dtype})")
    fi = torch.finfo(s.dtype)
    tiny = torch.full_like(s, fi.tiny * fi.eps)  # smallest subnormal of scale_dtype
    s = torch.where(s == 0, torch.where(s32 == 0, torch.ones_like(s), tiny), s)
    if lo is None:
        return s, None
    if spec.zero_mode in ("float", "offset"):
        return s, lo.to(spec.torch_scale_dtype)
    z = torch.round(-lo / s.to(torch.float32)).clamp(0, spec.qmax)  # -lo/s in float32, half-to-even
    return s, z.to(torch.int16)


def _clip_pair(clip, shape: tuple[int, int], spec: QuantSpec, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """clip: a ratio (scalar or broadcastable to [N, G]) shrinking both ends of the range, or an [N, G, 2] tensor of
    separate (min, max) ratios (asymmetric specs only). Returns both as [N, G] tensors (on `device`: the weight's)."""
    c = torch.as_tensor(clip, dtype=torch.float32, device=device)
    pair = c.dim() == 3
    if pair and (spec.symmetric or c.shape[-1] != 2):
        raise ValueError(f"a (min, max) clip pair of shape {tuple(c.shape)} needs an asymmetric spec and shape [N, G, 2]")
    try:
        lo = torch.broadcast_to(c[..., 0] if pair else c, shape)
        hi = torch.broadcast_to(c[..., 1] if pair else c, shape)
    except RuntimeError as e:
        raise ValueError(f"clip of shape {tuple(c.shape)} does not broadcast to scale shape {shape}") from e
    for t in (lo, hi):
        if bool((t <= 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError("clip ratios must be finite and > 0")
    return lo, hi


def _check_params(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None):
    if spec.progressive or spec.micro_scale is not None:
        raise ValueError("a two-level spec (progressive or micro-scaled) has two scale levels: use quantize_tensor / "
                         "QuantizedTensor.dequantize")
    shape = _scale_shape(w, spec)
    if tuple(scale.shape) != shape:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {shape}")
    if spec.symmetric:
        if zero is not None:
            raise ValueError(f"{spec.short()} takes no zero point")
    elif zero is None or tuple(zero.shape) != shape:
        raise ValueError(f"asymmetric spec needs a zero point of shape {shape}")


def quantize(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes [N, K]: int16 for int dtypes, uint8 bit patterns for fp dtypes. Uses the (already rounded) scale."""
    _check_params(w, spec, scale, zero)
    g = _grouped(w.detach().to(torch.float32), spec)
    x = g / scale.to(torch.float32).unsqueeze(-1)  # w / s in float32 (one rounding)
    if spec.is_fp:
        return fp_encode(x, spec.dtype).reshape(w.shape)
    if zero is not None and spec.zero_mode in ("float", "offset"):   # (w - z) / s: the grid starts at the float zero
        x = (g - zero.to(torch.float32).unsqueeze(-1)) / scale.to(torch.float32).unsqueeze(-1)
    elif zero is not None:
        x = x + zero.to(torch.float32).unsqueeze(-1)  # asym: round(w/s + z), the sum also in float32
    q = torch.round(x).clamp(spec.qmin, spec.qmax)  # half-to-even, then clamp to the code range
    return q.to(torch.int16).reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The decode rule of the spec, cast to dtype at the end. An integer code equal to the zero point gives +0."""
    _check_params(codes, spec, scale, zero)
    q = _grouped(codes, spec)
    s = scale.unsqueeze(-1)
    if spec.is_fp:  # element (<= 4 significant bits) * scale (<= 24): exact in float32 for fp16/bf16 scales
        out = fp_decode(q, spec.dtype) * s.to(torch.float32)
    elif spec.symmetric:
        out = q.to(torch.float32) * s.to(torch.float32)
    elif spec.zero_mode == "float":   # the kernel's fma q*s + z in scale_dtype: exact in float64, one rounding
        out = (q.to(torch.float64) * s.to(torch.float64) + zero.unsqueeze(-1).to(torch.float64)
               ).to(spec.torch_scale_dtype)
    elif spec.zero_mode == "offset":   # q*s + z applied by a GEMM epilogue, never rounded to 16 bits: float64, once
        out = q.to(torch.float64) * s.to(torch.float64) + zero.unsqueeze(-1).to(torch.float64)
    elif spec.zero_mode == "integer":  # (q - z) * s: |q - z| < 256, exact in float32 for fp16/bf16 scales
        out = (q.to(torch.float32) - zero.unsqueeze(-1).to(torch.float32)) * s.to(torch.float32)
    else:
        # "scaled" (TinyChat/AWQ kernels): sz = -(z * s) stored in scale_dtype, then one fused q * s + sz in
        # scale_dtype. float64 holds q * s and the sum exactly, so the only roundings are the two to scale_dtype.
        sd = s.to(torch.float64)
        sz = (-(zero.unsqueeze(-1).to(torch.float64) * sd)).to(spec.torch_scale_dtype).to(torch.float64)
        out = (q.to(torch.float64) * sd + sz).to(spec.torch_scale_dtype)
    return out.to(dtype).reshape(codes.shape)


@dataclass
class QuantizedTensor:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    # two-level specs: the level-0 scale, per channel [N, 1] (progressive) or per tensor [1, 1] (micro-scaled, whose
    # `scale` then holds the micro-scales [N, G] as float32 values of spec.micro_scale); scale/zero: level 1
    scale0: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.spec.progressive:
            return progressive.dequantize(self.codes, self.scale0, self.scale, self.zero, self.spec.group_size, dtype)
        if self.spec.micro_scale is not None:
            return dequantize_two_level(self.codes, self.scale, self.scale0, self.spec, dtype)
        return dequantize(self.codes, self.scale, self.zero, self.spec, dtype)


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0) -> QuantizedTensor:
    if spec.progressive:
        return _quantize_progressive(w, spec, clip)
    if spec.micro_scale is not None:
        s0, micro = two_level_qparams(w, spec, clip)
        return QuantizedTensor(quantize_two_level(w, spec, micro, s0), micro, None, spec, scale0=s0)
    scale, zero = compute_qparams(w, spec, clip)
    return QuantizedTensor(quantize(w, spec, scale, zero), scale, zero, spec)


def progressive_qparams(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0):
    """(s1 [N, 1], x0 [N, K], s2 [N, G], z [N, G]) of a progressive spec; clip shrinks each level-1 group's range."""
    s1, x0 = progressive.level0(w, spec.bits, spec.torch_scale_dtype)
    c_lo, c_hi = _clip_pair(clip, _scale_shape(w, spec), spec, w.device)
    s2, z = progressive.level1_params(x0, spec.group_size, spec.bits, c_lo, c_hi)
    return s1, x0, s2, z


def _quantize_progressive(w: torch.Tensor, spec: QuantSpec, clip) -> QuantizedTensor:
    s1, x0, s2, z = progressive_qparams(w, spec, clip)
    codes = progressive.level1_codes(x0, s2, z, spec.group_size, spec.bits)
    return QuantizedTensor(codes, s2, z, spec, scale0=s1)


# ------------------------------------------------------------------------------ two levels: fp8 micro-scales

def two_level_qparams(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s0 [1, 1] in scale_dtype, micro [N, G] float32 holding spec.micro_scale values) of a micro-scaled spec, as
    DeepCompressor makes NVFP4 weights (sfp4_e2m1_all, scale_dtypes [None, sfp8_e4m3_nan]: quantizer/impl/scale.py
    quantize_scale with the spans infer_scale_quant_spans gives, [448, 1], @ 69f3473):
      s_g   = amax_g * clip / qmax                     the group's ideal scale, fp32 (qmax 6 for e2m1);
      s0    = RNE_scale_dtype(max_g s_g / micro_max)   so that the largest group's micro-scale is about micro_max;
      micro = RNE_micro(s_g / s0)                      fp32 quotient, rounded once, saturating at micro_max (448:
                                                       s0 rounded down can put the largest just above it).
    An all-zero tensor gets s0 = 1 and an all-zero group micro 1 (its codes are 0); a nonzero group whose micro-scale
    rounds to 0 gets the smallest subnormal instead (its codes stay in range: |w| / (2^-9 s0) < 3), and a nonzero s0
    that underflows scale_dtype its smallest subnormal, as compute_qparams does for one-level scales."""
    if spec.micro_scale is None:
        raise ValueError(f"{spec.short()} has one scale level: use compute_qparams")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    shape = _scale_shape(w, spec)
    c_lo, c_hi = _clip_pair(clip, shape, spec, w.device)
    s_g = _grouped(w.detach().to(torch.float32), spec).abs().amax(-1) * c_hi / spec.qmax
    if not bool(torch.isfinite(s_g).all()):
        raise ValueError("non-finite weights: no scale can hold them")
    top = s_g.max().reshape(1, 1) / _fmt(spec.micro_scale).max
    s0 = top.to(spec.torch_scale_dtype)
    fi = torch.finfo(s0.dtype)
    s0 = torch.where(s0 == 0, torch.where(top == 0, torch.ones_like(s0), torch.full_like(s0, fi.tiny * fi.eps)), s0)
    if not bool(torch.isfinite(s0).all()):
        raise ValueError(f"the per-tensor scale overflows {spec.scale_dtype}")
    micro = round_to_fp(s_g / s0.to(torch.float32), spec.micro_scale)
    sub = 2.0 ** (_fmt(spec.micro_scale).emin - _fmt(spec.micro_scale).mbits)   # smallest subnormal
    micro = torch.where(micro == 0, torch.where(s_g == 0, torch.ones_like(micro), torch.full_like(micro, sub)), micro)
    return s0, micro


def quantize_two_level(w: torch.Tensor, spec: QuantSpec, micro: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """uint8 element codes [N, K]: the RNE (saturating) element of w / (micro * s0), the divisor formed exactly in
    float32 (<= 4 + 11 significant bits) and the quotient rounded once, then to the element format."""
    g = _grouped(w.detach().to(torch.float32), spec)
    div = (micro.to(torch.float32) * s0.to(torch.float32)).unsqueeze(-1)
    return fp_encode(g / div, spec.dtype).reshape(w.shape)


def dequantize_two_level(codes: torch.Tensor, micro: torch.Tensor, s0: torch.Tensor, spec: QuantSpec,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """element * micro * s0, exact in float32 (<= 2 + 4 + 11 significant bits; for fp16 s0 a product below
    float32's normal range would round, which takes weights under 1e-30), then cast to dtype."""
    q = _grouped(fp_decode(codes, spec.dtype), spec)
    out = q * micro.to(torch.float32).unsqueeze(-1) * s0.to(torch.float32).unsqueeze(-1)
    return out.to(dtype).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    return quantize_tensor(w, spec, clip).dequantize(w.dtype)


def quant_error(w: torch.Tensor, w_q: torch.Tensor) -> dict:
    """mse, sqnr_db (signal power over error power, in float64; inf for an exact match) and max_abs error."""
    a, b = w.detach().to(torch.float64), w_q.detach().to(torch.float64)
    err = a - b
    sig, noise = float((a * a).sum()), float((err * err).sum())
    if noise == 0:
        sqnr = math.inf
    elif sig == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(sig / noise)
    return {"mse": float((err * err).mean()), "sqnr_db": sqnr, "max_abs": float(err.abs().max())}


def fake_quantize_fast(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """For searches (AWQ scales, clip ratios): the same scales and codes as fake_quantize, decoded as (q - z) * s in
    float32 without validation. For zero_mode "scaled" this differs from the exact decode by at most one rounding to
    scale_dtype per element, which can flip a near-tie between candidates (about 0.2% of clip choices, each within
    ~1% in error); the final quantization always uses quantize_tensor."""
    if spec.micro_scale is not None:   # the element values themselves (no codes): exact, as dequantize_two_level
        s0, micro = two_level_qparams(w, spec, clip)
        div = (micro * s0.to(torch.float32)).unsqueeze(-1)
        g = w.float().reshape(w.shape[0], spec.num_groups(w.shape[1]), -1)
        return (round_to_fp(g / div, spec.dtype) * div).reshape(w.shape).to(w.dtype)
    if spec.is_fp:
        return fake_quantize(w, spec, clip)
    if spec.progressive:   # the same levels as quantize_tensor, without the kernel-bound checks of the final decode
        s1, x0, s2, z = progressive_qparams(w, spec, clip)
        q = progressive.level1_codes(x0, s2, z, spec.group_size, spec.bits).float().view(w.shape[0], -1, spec.group_size)
        w8 = q * s2.float().unsqueeze(-1) - z.float().unsqueeze(-1)
        return (w8.reshape(w.shape) * s1.float()).to(w.dtype)
    n, k = w.shape
    g = w.float().reshape(1, 1, -1) if spec.group_size == -1 else w.float().reshape(n, spec.num_groups(k), -1)
    c = torch.as_tensor(clip, dtype=torch.float32)
    c_lo, c_hi = (c[..., 0:1], c[..., 1:2]) if c.dim() == 3 else ((c.unsqueeze(-1),) * 2 if c.dim() == 2 else (c, c))
    if spec.symmetric:
        s = g.abs().amax(-1, keepdim=True) * c_hi / spec.qmax
        z = None
    elif spec.zero_mode in ("float", "offset"):
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        mid = (lo + hi) / 2
        lo, hi = mid - (mid - lo) * c_lo, mid + (hi - mid) * c_hi
        s = (hi - lo) / spec.qmax
    else:
        lo = g.amin(-1, keepdim=True).clamp(max=0) * c_lo
        s = (g.amax(-1, keepdim=True).clamp(min=0) * c_hi - lo) / spec.qmax
    s = s.to(spec.torch_scale_dtype).float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    if spec.symmetric:
        return (torch.round(g / s).clamp(spec.qmin, spec.qmax) * s).reshape(w.shape)
    if spec.zero_mode in ("float", "offset"):
        z = lo.to(spec.torch_scale_dtype).float()
        return (torch.round((g - z) / s).clamp(0, spec.qmax) * s + z).reshape(w.shape)
    z = torch.round(-lo / s).clamp(0, spec.qmax)
    return ((torch.round(g / s + z).clamp(spec.qmin, spec.qmax) - z) * s).reshape(w.shape)
