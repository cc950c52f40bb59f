"""QServe checkpoint layout (research/targets.md 1A and 5): W4A8 int8 [N, K/2] qweight in 32x32 mma tiles, level-2
int8 [G, N] s2_scales / s2_zeros reordered inside 32 columns, plain int8 W8A8 weights, and the exact weight QServe's
GEMMs rebuild from them (qserve/modeling/layers/quantized_linear/w4a8_linear.py, kernels/csrc/qgemm/)."""
from __future__ import annotations

import torch

TILE = 32            # W4A8 packing works on 32(n) x 32(k) tiles: N and K must be multiples of 32
GROUP_SIZE = 128     # the only group size of QServe's g128 kernel (G = 128 is a constexpr there); 0 = per channel
GROUP_SIZES = (0, GROUP_SIZE)

# qweight. Write n = 32*a0 + 16*a1 + 8*a2 + a3 and k = 32*b0 + 16*b1 + 4*b2 + b3. Code (n, k) lives in flat byte
#     ((((a0*K/32 + b0)*8 + a3)*4 + b2)*2 + b1)*8 + a2*4 + b3,   low nibble if a1 == 0, high nibble if a1 == 1,
# so rows n and n+16 share a byte. Lane a3*4 + b2 owns 16 contiguous bytes = the B fragment of mma.m16n8k32.s8: the
# kernel splits each uint32 with 0x0F0F0F0F / 0xF0F0F0F0 >> 4 into n-tiles {0-7, 16-23} (bytes 0-3) and {8-15, 24-31}
# (bytes 4-7), then k-half b1 = 1 in bytes 8-15. As a view: codes (a0, a1, a2, a3, b0, b1, b2, b3) permuted to
# (a0, b0, a3, b2, b1, a2, b3, a1), the last axis being the nibble.
_PACKED_ORDER = (0, 4, 3, 6, 5, 2, 7, 1)
_UNPACKED_ORDER = (0, 7, 5, 2, 1, 4, 3, 6)   # inverse permutation


class LayoutError(ValueError):
    """A layer (or tensor) that QServe's layout cannot hold; the message names the layer and the problem."""


def check_shape(name: str, n: int, k: int, group_size: int, bits: int = 4) -> None:
    """Raise LayoutError naming `name` and every violated rule. W4A8: N % 32 == K % 32 == 0 (32x32 tiles),
    group_size 0 (per channel) or 128, and K % 128 == 0 for 128. W8A8 (bits=8): plain [N, K], per channel only
    (QServe's converter asserts group -1 for W8)."""
    problems = []
    if n <= 0 or k <= 0:
        problems.append(f"shape [{n}, {k}] is empty")
    if bits == 8:
        if group_size != 0:
            problems.append(f"group size {group_size}: QServe's W8A8 is per channel only (0)")
    elif bits != 4:
        problems.append(f"{bits}-bit weights: QServe takes W4A8 or W8A8")
    else:
        if group_size not in GROUP_SIZES:
            problems.append(f"group size {group_size} is not supported: QServe takes per-channel (0) or 128")
        if n % TILE:
            problems.append(f"out_features {n} is not a multiple of {TILE} (W4A8 packs 32x32 tiles)")
        if k % TILE:
            problems.append(f"in_features {k} is not a multiple of {TILE} (W4A8 packs 32x32 tiles)")
        if group_size == GROUP_SIZE and k % GROUP_SIZE:
            problems.append(f"in_features {k} is not a multiple of the group size {GROUP_SIZE}")
    if problems:
        raise LayoutError(f"{name}: " + "; ".join(problems))


def kernel_notes(n: int, k: int, group_size: int, bits: int = 4) -> list[str]:
    """Why QServe's own GEMMs could not run a shape that packs ([] if they can). From the launch code of
    kernels/csrc/qgemm/{w4a8_per_chn,w4a8_per_group}/gemm_cuda.cu and w8a8/w8a8_gemm_cuda.cu: the grid has N / CTA_N
    blocks (truncating: leftover columns are never written) and K is not masked (gemm_iters = ceil(K / CTA_K) reads
    past each row). Only M (tokens) is masked. Tiles (CTA_N, CTA_K) by M:
      per channel: M > 256 -> (128, 64); 128 <= M <= 256 -> (64, 64); M < 128 -> (64, 128)
      g128:        M > 128 -> (128, 64); M == 128 -> (64, 64) if K <= 4096 else (64, 128); M < 128 -> (64, 128)
      W8A8:        M > 128 -> (256, 64); otherwise (64, 64)
    Every tile's prologue also preloads STAGES-1 k-tiles without a bound check (up to 256 k for W4A8, 320 for W8A8)."""
    notes = []
    if bits == 8:
        big_n, big_m, ks, prologue = 256, "M > 128", (64,), 320
    else:
        big_n, big_m, ks, prologue = 128, "M > 256" if group_size == 0 else "M > 128", (64, 128), 256
    if n % 64:
        notes.append(f"N = {n} is not a multiple of 64: every QServe GEMM tile would leave the last {n % 64} "
                     f"output columns unwritten")
    elif n % big_n:
        notes.append(f"N = {n} is not a multiple of {big_n}: QServe's {big_m} tile would leave the last "
                     f"{n % big_n} output columns unwritten")
    for ck in ks:
        if k % ck:
            which = "every tile" if ck == min(ks) else "the M < 128 tile (CTA_K = 128)"
            notes.append(f"K = {k} is not a multiple of {ck}: {which} would read past K (K is not masked)")
            break
    if 0 < k < prologue:
        notes.append(f"K = {k} < {prologue}: the pipeline prologue reads up to {prologue} k unmasked, past the end of "
                     f"the operands (results unaffected, but out-of-bounds reads; untested)")
    return notes


def _integral(t: torch.Tensor, what: str, lo: int, hi: int) -> torch.Tensor:
    """t as int16 after checking it holds integers in [lo, hi]."""
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise LayoutError(f"{what} must hold integers, got {t.dtype}")
    if t.dtype.is_floating_point and not bool((t == torch.round(t)).all()):
        raise LayoutError(f"{what} must hold integers")
    if t.numel() and (float(t.min()) < lo or float(t.max()) > hi):
        raise LayoutError(f"{what} must lie in [{lo}, {hi}], got [{float(t.min()):g}, {float(t.max()):g}]")
    return t.to(torch.int16)


def _shape_2d(t: torch.Tensor, what: str, shape: tuple[int, int] | None = None) -> None:
    if t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
        raise LayoutError(f"{what} has shape {tuple(t.shape)}, expected " + (f"{list(shape)}" if shape else "2-D"))


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (integers 0..15, N and K multiples of 32) -> int8 qweight [N, K/2] in the tile layout above."""
    _shape_2d(codes, "codes")
    n, k = codes.shape
    check_shape("codes", n, k, 0)
    x = _integral(codes, "codes", 0, 15).reshape(n // 32, 2, 2, 8, k // 32, 2, 4, 4).permute(_PACKED_ORDER)
    byte = x[..., 0] | (x[..., 1] << 4)                      # 0..255 in int16
    byte = torch.where(byte >= 128, byte - 256, byte)        # the same 8 bits as two's-complement int8
    return byte.to(torch.int8).reshape(n, k // 2).contiguous()


def unpack_qweight(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int8 qweight [N, K/2] -> int16 codes [N, K] (exact inverse of pack_qweight)."""
    check_shape("qweight", n, k, 0)
    _shape_2d(qweight, "qweight", (n, k // 2))
    byte = qweight.to(torch.int16) & 0xFF                     # sign-extended int8 -> its bit pattern
    nib = torch.stack((byte & 0xF, byte >> 4), dim=-1)        # (n, k/2, 2): nibble a1 of each byte
    x = nib.reshape(n // 32, k // 32, 8, 4, 2, 2, 4, 2).permute(_UNPACKED_ORDER)
    return x.reshape(n, k).contiguous()


codes_per_channel = unpack_qweight   # per channel the stored codes are the GEMM's unsigned weights


def pack_s2(t: torch.Tensor) -> torch.Tensor:
    """Level-2 s2_scales or s2_zeros [N, G] (integers in int8 range) -> int8 [G, N], group-major; inside each 32
    columns stored position p = 4*(n%8) + (n%32)//8 holds channel n, i.e. the order 0, 8, 16, 24, 1, 9, 17, 25, ...
    (a [4, 8] -> [8, 4] transpose): lane group a3 of the kernel loads one uint32 = channels a3, a3+8, a3+16, a3+24."""
    _shape_2d(t, "s2 tensor")
    n, g = t.shape
    if n % TILE:
        raise LayoutError(f"s2 tensor has {n} channels, not a multiple of {TILE}")
    x = _integral(t, "s2 tensor", -128, 127).t().reshape(g, n // 32, 4, 8).transpose(-1, -2)
    return x.reshape(g, n).to(torch.int8).contiguous()


def unpack_s2(t: torch.Tensor) -> torch.Tensor:
    """int8 [G, N] as stored -> int16 [N, G] in channel order (exact inverse of pack_s2)."""
    _shape_2d(t, "s2 tensor")
    g, n = t.shape
    if n % TILE:
        raise LayoutError(f"s2 tensor has {n} channels, not a multiple of {TILE}")
    return t.to(torch.int16).reshape(g, n // 32, 8, 4).transpose(-1, -2).reshape(g, n).t().contiguous()


def int8_codes_g128(qweight: torch.Tensor, s2_scales: torch.Tensor, s2_zeros: torch.Tensor, n: int,
                    k: int) -> torch.Tensor:
    """The int8 weight w8 = q*s2 + s2_zeros [N, K] (int16) that the g128 kernel feeds to its int8 mma. The kernel
    reads s2 as an unsigned byte, multiplies q*s2 inside one byte of a uint32 (so q*s2 must be 0..255 or it carries
    into the neighbour) and adds the zero bytewise with __vadd4 (wrapping mod 256), which equals the true sum only if
    that lies in [-128, 127]. Raises LayoutError where a checkpoint breaks either bound. The group size is read
    from s2's shape [K/G, N]: 128 for QServe's kernel, 64 for dcc's g64 artifacts (same math, dcc's runtime only)."""
    check_shape("qweight", n, k, 0)
    g = s2_scales.shape[0] if s2_scales.dim() == 2 else 0
    if g <= 0 or k % g or (k // g) % 32:
        raise LayoutError(f"s2_scales has shape {tuple(s2_scales.shape)}: K = {k} is not [K/G, N] for a group size "
                          f"G that is a multiple of 32")
    gsize = k // g
    for what, t in (("s2_scales", s2_scales), ("s2_zeros", s2_zeros)):
        _shape_2d(t, what, (g, n))
        if t.dtype != torch.int8:
            raise LayoutError(f"{what} must be int8, got {t.dtype}")
    q = unpack_qweight(qweight, n, k).to(torch.int32).reshape(n, g, gsize)
    s2 = (unpack_s2(s2_scales).to(torch.int32) & 0xFF).unsqueeze(-1)
    prod = q * s2
    if int(prod.max()) > 255:
        raise LayoutError(f"s2_scales: q*s2 reaches {int(prod.max())} > 255 (the kernel multiplies inside one byte)")
    w8 = prod + unpack_s2(s2_zeros).to(torch.int32).unsqueeze(-1)
    if int(w8.min()) < -128 or int(w8.max()) > 127:
        raise LayoutError(f"s2_zeros: q*s2 + s2_zeros spans [{int(w8.min())}, {int(w8.max())}], outside int8 "
                          f"(the kernel's bytewise add wraps)")
    return w8.reshape(n, k).to(torch.int16)


def _s1(t: torch.Tensor, what: str, n: int) -> torch.Tensor:
    if t.dtype != torch.float16 or t.numel() != n:
        raise LayoutError(f"{what} must be float16 [{n}], got {t.dtype} {tuple(t.shape)}")
    return t.reshape(n, 1)


def decode_w4a8(qweight: torch.Tensor, s1_scales: torch.Tensor, n: int, k: int, s1_szeros: torch.Tensor | None = None,
                s2_scales: torch.Tensor | None = None, s2_zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 [N, K] weight QServe's W4A8 GEMM applies. Per channel (s1_szeros given): w = q*s1 - s1_szeros, the
    epilogue's psum*s1 - szeros*a_ssum split per element. fp16 values are multiples of 2^-24 below 2^16, so
    q*s1 - szeros is a multiple of 2^-24 below 2^21: exact in float64, then rounded once to float32 (the kernel never
    forms w itself). g128 (s2_scales and s2_zeros given): w = s1*w8 with w8 = int8_codes_g128, exact in float32
    (11-bit fp16 times an 8-bit integer)."""
    s1 = _s1(s1_scales, "s1_scales", n)
    if s1_szeros is not None and s2_scales is None and s2_zeros is None:
        q = codes_per_channel(qweight, n, k).to(torch.float64)
        w = q * s1.to(torch.float64) - _s1(s1_szeros, "s1_szeros", n).to(torch.float64)
        return w.to(torch.float32)
    if s1_szeros is None and s2_scales is not None and s2_zeros is not None:
        return int8_codes_g128(qweight, s2_scales, s2_zeros, n, k).to(torch.float32) * s1.to(torch.float32)
    raise LayoutError("decode_w4a8 takes s1_szeros (per channel) or s2_scales and s2_zeros (g128), not both")


def pack_w8(codes: torch.Tensor) -> torch.Tensor:
    """W8A8: codes [N, K] (integers in [-127, 127], symmetric; QServe's converter asserts the range) -> int8 [N, K]
    plain row-major."""
    _shape_2d(codes, "codes")
    check_shape("codes", *codes.shape, 0, bits=8)
    return _integral(codes, "W8A8 codes", -127, 127).to(torch.int8).contiguous()


def decode_w8a8(weight: torch.Tensor, dequant_scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] = weight * dequant_scale[n]: exact (8-bit integer times an fp16 scale fits float32)."""
    _shape_2d(weight, "weight")
    if weight.dtype != torch.int8:
        raise LayoutError(f"weight must be int8, got {weight.dtype}")
    return weight.to(torch.float32) * _s1(dequant_scale, "dequant_scale", weight.shape[0]).to(torch.float32)
