"""llm-awq's W4A16 "v2" tensor layout, which TinyChat reads (and Nunchaku's W4A16 layers, nunchaku/layout_awq.py):
int16 [N/4, K] interleaved qweight, group-major padded scales and scaled zeros, and the exact weight the kernels
reconstruct from them."""
from __future__ import annotations

import torch

# Group sizes the layout defines (padded_groups knows their scale-row padding) ...
GROUP_SIZES = (32, 64, 128)
# ... and the ones TinyChat's own v2 GEMM/GEMV kernels take: G = 128 is hard-coded there (the GEMV throws for any
# other size). Artifacts with G = 32/64 are valid layouts but only dcc's runtime decodes them.
KERNEL_GROUP_SIZES = (128,)

INTERLEAVE = 4  # rows of W whose codes share one run of int16 words
KSTRIDE = 64    # k extent of one interleaved block: 4 rows x 64 k = 256 nibbles = 64 int16 words
PACK_ROWS = 8   # scale rows are padded to a multiple of PACK_ROWS * m (llm-awq's pack_num = 32 // 4 bits)

# Bit layout of qweight (n = output row, k = input column). Write k = 64*kt + 32*h + 8*a + 2*b + c with
# h in 0..1, a in 0..3, b in 0..3, c in 0..1 (so p = k % 32 = 8a + 2b + c). Code (n, k) lives in
#     qweight[n // 4, 64*kt + 16*(n % 4) + 8*h + 2*b + c],  nibble a  (bits 4a..4a+3, lowest nibble first).
# Per 32-run e[0..31] of a row the 8 words are word j = e[j] | e[8+j] << 4 | e[16+j] << 8 | e[24+j] << 12, so in
# the uint32 made of words 2j, 2j+1 nibbles i and i+4 hold the adjacent pair e[8i+2j], e[8i+2j+1], which the kernel's
# lop3/0x6400 dequant turns into one half2. Per 64-run of k, the 16 words of row 4r+0, then of rows 4r+1, 4r+2 and
# 4r+3 follow each other.
# (This is the same placement as pack_intweight's permutations: p -> p' = 8b + 2a + c, then within each 8,
# p'%8 = 2d + e -> 4e + d, then 4-row x 64-k blocking with 4 nibbles per int16.)
# As a tensor view: codes [N, K] -> (N/4, r=4, kt, h=2, a=4, b=4, c=2), permuted to (N/4, kt, r, h, b, c, a) and
# read as (N/4, K, 4 nibbles).
_PACKED_ORDER = (0, 2, 1, 3, 5, 6, 4)     # (n4, r, kt, h, a, b, c) -> (n4, kt, r, h, b, c, a)
_UNPACKED_ORDER = (0, 2, 1, 3, 6, 4, 5)   # inverse permutation


class LayoutError(ValueError):
    """A layer (or tensor) that the TinyChat layout cannot hold; the message names the layer and the problem."""


def check_shape(name: str, out_features: int, in_features: int, group_size: int) -> None:
    """Raise LayoutError naming `name` and every violated rule: N % 4 == 0 (4-row interleave), K % 64 == 0
    (64-k blocks), K % group_size == 0, and group_size in GROUP_SIZES (32, 64, 128). Only G = 128 runs on
    TinyChat's own kernels (KERNEL_GROUP_SIZES); that is not checked here."""
    n, k, g = out_features, in_features, group_size
    problems = []
    if n <= 0 or k <= 0:
        problems.append(f"shape [{n}, {k}] is empty")
    if g not in GROUP_SIZES:
        problems.append(f"group size {g} is not one of {GROUP_SIZES} (TinyChat's kernels take "
                        f"{' or '.join(map(str, KERNEL_GROUP_SIZES))} only)")
    if n % INTERLEAVE:
        problems.append(f"out_features {n} is not a multiple of {INTERLEAVE} (rows are interleaved in fours)")
    if k % KSTRIDE:
        problems.append(f"in_features {k} is not a multiple of {KSTRIDE} (codes are packed in 64-column blocks)")
    if g > 0 and k % g:
        problems.append(f"in_features {k} is not a multiple of group size {g} (no partial groups)")
    if problems:
        raise LayoutError(f"{name}: " + "; ".join(problems))


def _multiplier(group_size: int) -> int:
    if group_size >= 128:
        return 1
    if group_size == 64:
        return 2
    if group_size == 32:
        return 4
    raise LayoutError(f"group size {group_size} has no TinyChat scale padding (defined for 32, 64 and >= 128)")


def padded_groups(num_groups: int, group_size: int) -> int:
    """Kg: the number of scale rows, num_groups rounded up to a multiple of 8*m (m = 1 for G >= 128, 2 for
    G = 64, 4 for G = 32)."""
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    unit = PACK_ROWS * _multiplier(group_size)
    return -(-num_groups // unit) * unit


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if n % INTERLEAVE or k % KSTRIDE or n == 0 or k == 0:
        raise LayoutError(f"codes of shape [{n}, {k}]: N must be a positive multiple of {INTERLEAVE} and K of "
                          f"{KSTRIDE}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"codes must be unsigned 4-bit (0..15), got range [{int(codes.min())}, {int(codes.max())}]")


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (any integer dtype, values 0..15) -> int16 qweight [N/4, K] in the layout above."""
    _check_codes(codes)
    n, k = codes.shape
    x = codes.to(torch.int32).reshape(n // 4, 4, k // 64, 2, 4, 4, 2).permute(_PACKED_ORDER)
    x = x.reshape(n // 4, k, 4)  # last axis = nibble a of word (n4, 64*kt + 16*r + 8*h + 2*b + c)
    word = x[..., 0] | (x[..., 1] << 4) | (x[..., 2] << 8) | (x[..., 3] << 12)  # 0..65535 in int32
    # int16 holds the same 16 bits: a word whose nibble 3 is >= 8 becomes negative (two's complement)
    word = torch.where(word >= 0x8000, word - 0x10000, word)
    return word.to(torch.int16).contiguous()


def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int16 qweight [N/4, K] -> int16 codes [N, K] (exact inverse of pack_qweight)."""
    if qweight.dtype.is_floating_point or qweight.dtype.is_complex or qweight.dtype == torch.bool:
        raise ValueError(f"qweight must be an int16 tensor, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] % KSTRIDE or qweight.numel() == 0:
        raise LayoutError(f"qweight must be [N/4, K] with K a positive multiple of {KSTRIDE}, "
                          f"got shape {tuple(qweight.shape)}")
    n4, k = qweight.shape
    word = qweight.to(torch.int32) & 0xFFFF  # sign-extended int16 -> its 16-bit pattern
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=qweight.device)
    nib = (word.unsqueeze(-1) >> shifts) & 0xF  # (n4, k, 4): nibble a of each word
    x = nib.reshape(n4, k // 64, 4, 2, 4, 2, 4).permute(_UNPACKED_ORDER)  # -> (n4, r, kt, h, a, b, c)
    return x.reshape(n4 * 4, k).to(torch.int16).contiguous()


def _check_integral(zero: torch.Tensor) -> None:
    if zero.dtype.is_floating_point:
        if not bool(torch.isfinite(zero).all()) or not bool((zero == torch.round(zero)).all()):
            raise ValueError("zero points must be integers")
    elif zero.dtype.is_complex or zero.dtype == torch.bool:
        raise ValueError(f"zero points must be integers, got {zero.dtype}")


def pack_scales(scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                dtype: torch.dtype = torch.float16, float_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scale [N, G] (values already in dtype) and integer zero points [N, G] -> (scales [Kg, N],
    scaled_zeros [Kg, N]) in dtype: transposed to group-major, rows G..Kg-1 zero, scaled_zeros = -(s*z) rounded
    once to dtype (s*z is exact in float64). float_zero: `zero` already is the 16-bit offset the kernel adds
    (w = q*s + zero, the kernel's fma allows any value), stored as is."""
    if scale.dim() != 2 or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"scale and zero must both be [N, G], got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be floating point, got {scale.dtype}")
    if not float_zero:
        _check_integral(zero)
    n, g = scale.shape
    s = scale.to(dtype)
    if not torch.equal(s.to(torch.float64), scale.to(torch.float64)):
        raise ValueError(f"scale is not exactly representable in {dtype}: round it (before quantizing) first")
    if float_zero:
        sz = zero.to(dtype)
        if not torch.equal(sz.to(torch.float64), zero.to(torch.float64)):
            raise ValueError(f"float zero is not exactly representable in {dtype}")
    else:
        sz = (-(zero.to(torch.float64) * s.to(torch.float64))).to(dtype)
    kg = padded_groups(g, group_size)
    scales = torch.zeros(kg, n, dtype=dtype, device=scale.device)
    scaled_zeros = torch.zeros(kg, n, dtype=dtype, device=scale.device)
    scales[:g] = s.t()
    scaled_zeros[:g] = sz.t()
    return scales, scaled_zeros


def unpack_scales(scales: torch.Tensor, scaled_zeros: torch.Tensor,
                  num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [Kg, N], scaled_zeros [Kg, N]) -> (scale [N, G], scaled_zeros [N, G]), padding rows dropped."""
    if scales.dim() != 2 or tuple(scales.shape) != tuple(scaled_zeros.shape):
        raise LayoutError(f"scales and scaled_zeros must both be [Kg, N], got {tuple(scales.shape)} and "
                          f"{tuple(scaled_zeros.shape)}")
    if num_groups > scales.shape[0]:
        raise LayoutError(f"scales has {scales.shape[0]} rows, fewer than the {num_groups} groups")
    return scales[:num_groups].t().contiguous(), scaled_zeros[:num_groups].t().contiguous()


def decode_weight(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
                  in_features: int) -> torch.Tensor:
    """The [N, K] weight the kernel computes, in the scales' dtype: w = rnd(q*s + sz) (the kernel does one fp16/bf16
    FMA). q*s + sz is formed exactly in float64 and cast with torch, which goes through float32: one rounding
    whenever the exact value fits float32, as it always does for integer zero points (sz = -s*z: at most 16
    significant bits); a free (float) zero far below q*s can round in float32 first, and the weight then differs from
    the engine's single rounding (rounding.round_once) by one ulp where that lands on a 16-bit tie. It is kept so
    because dcc.ir.formats.dequantize, whose values the manifest's checksums hold, rounds the same way: the two must
    change together."""
    k = in_features
    if qweight.dim() != 2 or qweight.shape[1] != k:
        raise LayoutError(f"qweight has shape {tuple(qweight.shape)}, expected [N/4, {k}]")
    if scales.dtype != scaled_zeros.dtype or not scales.dtype.is_floating_point:
        raise LayoutError(f"scales ({scales.dtype}) and scaled_zeros ({scaled_zeros.dtype}) must share one float "
                          f"dtype")
    if group_size <= 0 or k % group_size:
        raise LayoutError(f"in_features {k} is not a multiple of group size {group_size}")
    n, g = 4 * qweight.shape[0], k // group_size
    kg = padded_groups(g, group_size)
    if tuple(scales.shape) != (kg, n):
        raise LayoutError(f"scales has shape {tuple(scales.shape)}, expected [{kg}, {n}] for {g} groups of "
                          f"{group_size}")
    q = unpack_qweight(qweight)
    s, sz = unpack_scales(scales, scaled_zeros, g)
    out = torch.empty(n, k, dtype=scales.dtype, device=qweight.device)
    step = max(4, (1 << 22) // k // 4 * 4)  # rows per float64 chunk (~32 MiB of float64 at a time)
    for r in range(0, n, step):
        qc = q[r:r + step].to(torch.float64).reshape(-1, g, group_size)
        w = qc * s[r:r + step].to(torch.float64).unsqueeze(-1) + sz[r:r + step].to(torch.float64).unsqueeze(-1)
        out[r:r + step] = w.reshape(-1, k).to(scales.dtype)
    return out
