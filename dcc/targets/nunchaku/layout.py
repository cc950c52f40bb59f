"""Nunchaku checkpoint layout (SVDQuant W4A4, research/targets.md 3A and 5): bit-exact pack/unpack of `qweight`
(int8 [N, K/2], 4-bit codes in the mma.m16n8k64 B-fragment order), `wscales` / `bias` / `smooth` / `wcscales`
(16-bit, 128-channel lane order), the NVFP4 fp8 micro-scales, and the 16x16-fragment `lora_up` / `lora_down`, plus
the padding of N and K to 128 and of the rank to 16, and the crop that undoes it. Everything here is a pure
permutation or bit packing: nothing quantizes or rounds.

Followed and checked against Nunchaku's own source, nunchaku-ai/nunchaku @ 92e46957 (Feb 2026, 1.3.0dev):
`NunchakuWeightPacker` in nunchaku/lora/flux/packer.py (pack_weight, pack_scale, pack_micro_scale,
pack_lowrank_weight/unpack_lowrank_weight, pad_weight, pad_scale, pad_lowrank_weight); the kernel side in
src/kernels/zgemm/gemm_base.cuh (load_wscale, pack_wscales: bias and wcscales are loaded as one group of wscales);
the shapes `GEMM_W4A4` allocates in src/Linear.cpp (qweight int8 [N', K'/2], wscales [K'/64, N'] or fp8 [K'/16, N'],
bias/smooth/wcscales [N'] or [K'], lora_down [K', R], lora_up [N', R], with N' and K' padded to 128). The converter
that writes these checkpoints, mit-han-lab/deepcompressor @ 69f3473 deepcompressor/backend/nunchaku/utils.py, has
the same packer (byte for byte the same formulas). research/nunchaku_2026.md records that src/kernels did not change
between mit-han-lab/nunchaku 4132b3b (where targets.md checked these rules on an H100) and 92e46957.

Notation: N = out_features, K = in_features, R = rank, G = groups per row. "Nibble j" = bits 4j..4j+3 of a
little-endian word. The AWQ W4A16 linears Nunchaku keeps for AdaNorm/modulation are in layout_awq.py."""
from __future__ import annotations

import torch

TILE_N = 128          # warp_n: output channels per packed block; N (and K for bias-like vectors of K) padded to it
TILE_K = 64           # WARP_K: k per mma.m16n8k64 step, also the INT4 group size
K_ALIGN = 128         # K is padded to 2 * 64: the GEMM unrolls k by 2 without a bound check (num_k_unrolls = 2)
RANK_ALIGN = 16       # the low-rank branch works on 16x16 fragments (and lora_scales has one float per 16 ranks)
LORA_TILE = 16
INT4_GROUP_SIZE = 64  # INT4: one 16-bit scale per 64 k
FP4_GROUP_SIZE = 16   # NVFP4: one fp8 e4m3 micro-scale per 16 k
SCALE_DTYPES = (torch.float16, torch.bfloat16)

# qweight. Write n = 128*nt + 16*np + 8*ns + nl and k = 64*kt + 32*ks + 8*kl + j (np, nl, j in 0..7; kl in 0..3;
# ns, ks in 0..1). Code (n, k) is nibble j of the int32 word
#     ((((nt*K/64 + kt)*8 + np)*8 + nl)*4 + kl)*4 + 2*ns + ks,
# i.e. byte 4*word + j//2, low nibble for even j (little endian), stored as value & 0xF (two's complement for INT4,
# the raw e2m1 code for NVFP4). Lane 4*nl + kl loads one uint4 per n-pack np: {ns=0: k 0..31 of the 64, then k
# 32..63; ns=1: the same}, which are the two .b32 B registers (k = 8*kl + j and 32 + 8*kl + j, n = groupID = nl) of the
# two mma.m16n8k64 n8-tiles 2*np and 2*np + 1. As a view: codes (nt, np, ns, nl, kt, ks, kl, j) permuted to
# (nt, kt, np, nl, kl, ns, ks, j).
_QW_ORDER = (0, 4, 1, 3, 6, 2, 5, 7)

# wscales / bias / smooth / wcscales. Write n = 128*nt + 16*a + 8*b + 2*c + d (a in 0..7, b in 0..1, c in 0..3, d in
# 0..1). Value (n, group g) sits at flat position ((nt*G + g)*8 + a)*16 + 4*c + 2*b + d, so the buffer is
# [N/128][G][128] although Nunchaku shapes it [G, N]. Lane 4*a + c loads 4 halves = channels 16a + {2c, 2c+1, 2c+8,
# 2c+9}: the accumulator columns (C fragment col = 2*(lane%4) + {0, 1}) it owns in the n8 tiles 2a and 2a + 1, and the
# kernel broadcasts them to the 8 lanes of that column (gemm_base.cuh broadcast_wscale). Lane 0 holds {0, 1, 8, 9},
# lane 1 {2, 3, 10, 11}, lane 4 {16, 17, 24, 25}. bias, smooth (over K) and wcscales are the G = 1 case.
# As a view: (nt, a, b, c, d, g) permuted to (nt, g, a, c, b, d).
_WS_ORDER = (0, 5, 1, 3, 2, 4)

# NVFP4 micro-scales (fp8 e4m3, one per 16 k). Write n = 128*nt + 32*sp + 8*a + b (sp, a in 0..3; b in 0..7) and the
# group g = 4*kt + q (kt = the 64-k step, q its 16-k subgroup). Scale (n, g) is byte
#     ((((nt*K/64 + kt)*8 + b)*4 + a)*4 + sp)*4 + q,
# so lane 4*b + a loads 16 bytes = 4 uint32 (sp = 0..3), each holding the 4 subgroup scales of channel b + 8a + 32sp
# (the scale-B thread selection of mma...block_scale.scale_vec::4X): lane 0 holds channels {0, 32, 64, 96}, lane 1
# {8, 40, 72, 104}, lane 4 {1, 33, 65, 97}. Shaped [K/16, N] like Nunchaku's. View: (nt, sp, a, b, kt, q) permuted to
# (nt, kt, b, a, sp, q).
_MS_ORDER = (0, 4, 3, 2, 1, 5)

# lora_up [N, R] and lora_down [R, K]: 16x16 tiles in mma.m16n8k16 B-fragment order. Inside a tile write the row
# u = 8*us + ul (output channel for up, rank for down) and the column v = 8*vs + 2*vl + e (rank for up, input channel
# for down), ul in 0..7, vl in 0..3, us, vs, e in 0..1. The element sits at
#     256*tile + (((ul*4 + vl)*2 + us)*2 + vs)*2 + e,
# so lane 4*ul + vl holds 8 halves, rows (ul, ul + 8) x columns (2vl, 2vl + 1, 2vl + 8, 2vl + 9): b0..b3 (k = 2t + e,
# 2t + 8 + e; n = groupID) of two m16n8k16 n8-tiles. Tiles: up (N/16, R/16) row-major, tile = (n/16)*(R/16) + r/16;
# down K-block-major, tile = (k/16)*(R/16) + r/16, and the packed down is shaped [K, R]. This is targets.md 3A's
#     up:   ((((n/16*R/16 + r/16)*8 + n%8)*4 + (r%8)/2)*2 + (n%16)/8)*4 + 2*((r%16)/8) + r%2
#     down: ((((k/16*R/16 + r/16)*8 + r%8)*4 + (k%8)/2)*2 + (r%16)/8)*4 + 2*((k%16)/8) + k%2.
# Views: up (nb, us, ul, rb, vs, vl, e) -> (nb, rb, ul, vl, us, vs, e); down [R, K] as (rb, us, ul, kb, vs, vl, e)
# -> (kb, rb, ul, vl, us, vs, e).
_UP_ORDER = (0, 3, 2, 5, 1, 4, 6)
_DOWN_ORDER = (3, 0, 2, 5, 1, 4, 6)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for dst, src in enumerate(order):
        inv[src] = dst
    return tuple(inv)


class LayoutError(ValueError):
    """A tensor that Nunchaku's layout cannot hold; the message names the tensor, its shape and the problem."""


# ------------------------------------------------------------------------------------------------ padding

def padded(size: int, multiple: int) -> int:
    """size rounded up to a multiple of `multiple`."""
    if size < 0 or multiple <= 0:
        raise ValueError(f"padded({size}, {multiple}): size must be >= 0 and multiple > 0")
    return -(-size // multiple) * multiple


def padded_dims(n: int, k: int, rank: int = 0) -> tuple[int, int, int]:
    """(N', K', R'): the checkpoint's dimensions, N and K padded to 128 and the rank to 16 (Linear.cpp, packer.py)."""
    return padded(n, TILE_N), padded(k, K_ALIGN), padded(rank, RANK_ALIGN)


def pad_to(t: torch.Tensor, sizes: tuple[int, ...], fill: float = 0, name: str = "tensor") -> torch.Tensor:
    """t padded at the end of each dim up to `sizes` (same number of dims) with `fill`; a copy."""
    if t.dim() != len(sizes) or any(s < d for s, d in zip(sizes, t.shape)):
        raise LayoutError(f"{name} of shape {tuple(t.shape)} cannot be padded to {tuple(sizes)}")
    out = torch.full(tuple(sizes), fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, d) for d in t.shape)] = t
    return out


def crop(t: torch.Tensor, sizes: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """The leading `sizes` block of t (the inverse of pad_to and of every pad_* below); a contiguous copy."""
    if t.dim() != len(sizes) or any(s > d or s < 0 for s, d in zip(sizes, t.shape)):
        raise LayoutError(f"{name} of shape {tuple(t.shape)} cannot be cropped to {tuple(sizes)}")
    return t[tuple(slice(0, s) for s in sizes)].contiguous()


def _require_dim(t: torch.Tensor, dims: int, name: str, what: str) -> None:
    if t.dim() != dims:
        raise LayoutError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def pad_codes(codes: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """codes [N, K] -> [N', K'] with N, K padded to 128 by code 0 (INT4 zero; e2m1 code 0 = +0.0)."""
    _require_dim(codes, 2, name, "[N, K] codes")
    n, k = codes.shape
    return pad_to(codes, (padded(n, TILE_N), padded(k, K_ALIGN)), 0, name)


def pad_group_scales(scales: torch.Tensor, group_size: int, fill: float = 1.0, name: str = "wscales") -> torch.Tensor:
    """scales [N, G] of groups of `group_size` (64 INT4, 16 NVFP4) -> [N', K'/group_size]: N to 128 and G to the
    groups of K padded to 128, filled with `fill` (DeepCompressor's converter pads scales with 1; the padded codes
    are 0, so the value does not reach the output). Note DeepCompressor pads NVFP4 groups only to a multiple of 4,
    short of Nunchaku's [K'/16, N'] when K % 128 != 0; this follows Linear.cpp."""
    _require_dim(scales, 2, name, "[N, G] scales")
    if group_size <= 0 or K_ALIGN % group_size:
        raise LayoutError(f"{name}: group size {group_size} does not divide {K_ALIGN}")
    n, g = scales.shape
    return pad_to(scales, (padded(n, TILE_N), padded(g * group_size, K_ALIGN) // group_size), fill, name)


def pad_channel_vector(v: torch.Tensor, fill: float = 1.0, name: str = "smooth") -> torch.Tensor:
    """bias [N] / smooth [K] / wcscales [N] -> length padded to 128 with `fill`. smooth needs 1 (the kernel divides
    the padded zero activations by it; 0 would give 0/0); for bias and wcscales the padded outputs are cropped, and
    DeepCompressor fills them with 1 as well."""
    _require_dim(v, 1, name, "a 1-D per-channel vector")
    return pad_to(v, (padded(v.shape[0], TILE_N),), fill, name)


def pad_lora_up(up: torch.Tensor, name: str = "lora_up") -> torch.Tensor:
    """up [N, R] -> [N', R']: N to 128 and the rank to 16, with zeros."""
    _require_dim(up, 2, name, "[N, R]")
    n, r = up.shape
    return pad_to(up, (padded(n, TILE_N), padded(r, RANK_ALIGN)), 0, name)


def pad_lora_down(down: torch.Tensor, name: str = "lora_down") -> torch.Tensor:
    """down [R, K] -> [R', K']: the rank to 16 and K to 128, with zeros."""
    _require_dim(down, 2, name, "[R, K]")
    r, k = down.shape
    return pad_to(down, (padded(r, RANK_ALIGN), padded(k, K_ALIGN)), 0, name)


# ------------------------------------------------------------------------------------------------ checks

def _check_multiple(name: str, shape: tuple[int, ...], label: str, size: int, multiple: int, hint: str) -> None:
    if size <= 0 or size % multiple:
        raise LayoutError(f"{name} has shape {shape}: {label} = {size} is not a positive multiple of {multiple}"
                          f" ({hint})")


def _check_scale_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SCALE_DTYPES:
        raise LayoutError(f"{name} must be float16 or bfloat16 (Nunchaku's model dtype), got {t.dtype} "
                          f"with shape {tuple(t.shape)}")


def _check_integer(t: torch.Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise LayoutError(f"{name} must be an integer tensor, got {t.dtype} with shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------------ qweight

def pack_qweight(codes: torch.Tensor, fp4: bool = False, name: str = "qweight") -> torch.Tensor:
    """codes [N, K] -> int8 qweight [N, K/2] in the word/nibble order above. INT4 (fp4=False): signed codes -8..7,
    stored two's complement; NVFP4 (fp4=True): e2m1 codes 0..15 (sign << 3 | magnitude index), stored raw.
    N and K must be multiples of 128 (pad_codes)."""
    _check_integer(codes, name)
    _require_dim(codes, 2, name, "[N, K] codes")
    shape = tuple(codes.shape)
    n, k = shape
    _check_multiple(name, shape, "N", n, TILE_N, "pad with pad_codes")
    _check_multiple(name, shape, "K", k, K_ALIGN, "pad with pad_codes; the GEMM reads k in pairs of 64")
    lo, hi = (0, 15) if fp4 else (-8, 7)
    c_min, c_max = int(codes.min()), int(codes.max())
    if c_min < lo or c_max > hi:
        kind = "e2m1 codes" if fp4 else "signed int4 codes"
        raise LayoutError(f"{name} of shape {shape}: {kind} must lie in [{lo}, {hi}], got [{c_min}, {c_max}]")
    nib = codes.to(torch.int32) & 0xF  # two's complement nibble for INT4; e2m1 codes are already 0..15
    x = nib.reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8).permute(_QW_ORDER)
    # last axis = nibble j of one word; byte b of the little-endian word is nibble 2b (low) | nibble 2b+1 (high)
    x = x.reshape(-1, 4, 2)
    byte = x[..., 0] | (x[..., 1] << 4)                                  # 0..255
    byte = torch.where(byte >= 128, byte - 256, byte)                    # the same 8 bits as int8
    return byte.to(torch.int8).reshape(n, k // 2).contiguous()


def unpack_qweight(qweight: torch.Tensor, fp4: bool = False, name: str = "qweight") -> torch.Tensor:
    """int8 qweight [N, K/2] -> int8 codes [N, K], the exact inverse of pack_qweight: signed -8..7 for INT4, the raw
    nibbles 0..15 for NVFP4 (fp4=True)."""
    if qweight.dtype not in (torch.int8, torch.uint8):
        raise LayoutError(f"{name} must be int8, got {qweight.dtype} with shape {tuple(qweight.shape)}")
    _require_dim(qweight, 2, name, "[N, K/2]")
    shape = tuple(qweight.shape)
    n, half_k = shape
    _check_multiple(name, shape, "N", n, TILE_N, "Nunchaku pads N to 128")
    _check_multiple(name, shape, "K/2", half_k, K_ALIGN // 2, "Nunchaku pads K to 128")
    k = 2 * half_k
    byte = qweight.to(torch.int32) & 0xFF
    nib = torch.stack((byte & 0xF, byte >> 4), dim=-1)                   # (n, k/2, 2): nibble 2b, 2b+1
    x = nib.reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8).permute(_inverse(_QW_ORDER)).reshape(n, k)
    if not fp4:
        x = torch.where(x >= 8, x - 16, x)
    return x.to(torch.int8).contiguous()


# ------------------------------------------------------------------------------------------------ wscales and vectors

def pack_wscales(scales: torch.Tensor, name: str = "wscales") -> torch.Tensor:
    """INT4 group scales [N, G] (fp16/bf16; G = K'/64) -> [G, N], physically [N/128][G][128] in the lane order above.
    N must be a multiple of 128 (pad_group_scales)."""
    _check_scale_dtype(scales, name)
    _require_dim(scales, 2, name, "[N, G] scales")
    shape = tuple(scales.shape)
    n, g = shape
    _check_multiple(name, shape, "N", n, TILE_N, "pad with pad_group_scales")
    _check_multiple(name, shape, "G", g, 1, "at least one group")
    x = scales.reshape(n // 128, 8, 2, 4, 2, g).permute(_WS_ORDER)
    return x.reshape(g, n).contiguous()  # flat order (nt, g, 128); the [G, N] shape is only nominal


def unpack_wscales(packed: torch.Tensor, name: str = "wscales") -> torch.Tensor:
    """[G, N] packed scales -> [N, G], the exact inverse of pack_wscales."""
    _check_scale_dtype(packed, name)
    _require_dim(packed, 2, name, "[G, N] packed scales")
    shape = tuple(packed.shape)
    g, n = shape
    _check_multiple(name, shape, "N", n, TILE_N, "Nunchaku pads N to 128")
    x = packed.reshape(n // 128, g, 8, 4, 2, 2).permute(_inverse(_WS_ORDER))
    return x.reshape(n, g).contiguous()


def pack_channel_vector(v: torch.Tensor, name: str = "bias") -> torch.Tensor:
    """bias [N'], smooth [K'] or wcscales [N'] (fp16/bf16, length a multiple of 128; pad_channel_vector) -> the same
    length in the wscales lane order with G = 1 (Nunchaku loads them with load_wscale(ptr, group 0))."""
    _require_dim(v, 1, name, "a 1-D per-channel vector")
    return pack_wscales(v.reshape(-1, 1), name).reshape(-1)


def unpack_channel_vector(packed: torch.Tensor, name: str = "bias") -> torch.Tensor:
    """The exact inverse of pack_channel_vector."""
    _require_dim(packed, 1, name, "a 1-D packed vector")
    return unpack_wscales(packed.reshape(1, -1), name).reshape(-1)


# ------------------------------------------------------------------------------------------------ NVFP4 micro-scales

def _as_e4m3(scales: torch.Tensor, name: str) -> torch.Tensor:
    if scales.dtype == torch.float8_e4m3fn:
        return scales
    if not scales.dtype.is_floating_point:
        raise LayoutError(f"{name} must be float8_e4m3fn scales, got {scales.dtype} with shape {tuple(scales.shape)}")
    fp8 = scales.to(torch.float8_e4m3fn)
    back = fp8.to(torch.float64)
    if not bool(torch.isfinite(scales).all()) or not torch.equal(back, scales.to(torch.float64)):
        raise LayoutError(f"{name} of shape {tuple(scales.shape)} is not exactly representable in float8_e4m3fn: "
                          f"round the scales to e4m3 first")
    return fp8


def pack_micro_scales(scales: torch.Tensor, name: str = "wscales") -> torch.Tensor:
    """NVFP4 micro-scales [N, K/16] (float8_e4m3fn, or a float tensor holding e4m3 values exactly) -> float8_e4m3fn
    [K/16, N], physically [N/128][K/64][8][4][4][4 bytes] as above. N must be a multiple of 128 and K/16 of 8
    (K padded to 128; pad_group_scales with group_size 16)."""
    _require_dim(scales, 2, name, "[N, K/16] micro-scales")
    shape = tuple(scales.shape)
    n, g = shape
    _check_multiple(name, shape, "N", n, TILE_N, "pad with pad_group_scales")
    _check_multiple(name, shape, "K/16", g, K_ALIGN // FP4_GROUP_SIZE, "K padded to 128; pad with pad_group_scales")
    raw = _as_e4m3(scales, name).view(torch.uint8)  # permute the bytes; fp8 values are never touched
    x = raw.reshape(n // 128, 4, 4, 8, g // 4, 4).permute(_MS_ORDER)
    return x.reshape(g, n).contiguous().view(torch.float8_e4m3fn)


def unpack_micro_scales(packed: torch.Tensor, name: str = "wscales") -> torch.Tensor:
    """float8_e4m3fn [K/16, N] packed micro-scales -> [N, K/16], the exact inverse of pack_micro_scales."""
    if packed.dtype != torch.float8_e4m3fn:
        raise LayoutError(f"{name} must be float8_e4m3fn, got {packed.dtype} with shape {tuple(packed.shape)}")
    _require_dim(packed, 2, name, "[K/16, N] packed micro-scales")
    shape = tuple(packed.shape)
    g, n = shape
    _check_multiple(name, shape, "N", n, TILE_N, "Nunchaku pads N to 128")
    _check_multiple(name, shape, "K/16", g, K_ALIGN // FP4_GROUP_SIZE, "Nunchaku pads K to 128")
    raw = packed.view(torch.uint8).reshape(n // 128, g // 4, 8, 4, 4, 4).permute(_inverse(_MS_ORDER))
    return raw.reshape(n, g).contiguous().view(torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------------ low-rank branch

def _check_lora(t: torch.Tensor, name: str, rows: str, cols: str) -> tuple[int, int]:
    _check_scale_dtype(t, name)
    _require_dim(t, 2, name, f"[{rows}, {cols}]")
    shape = tuple(t.shape)
    _check_multiple(name, shape, rows, shape[0], LORA_TILE, "pad_lora_up / pad_lora_down pad it")
    _check_multiple(name, shape, cols, shape[1], LORA_TILE, "pad_lora_up / pad_lora_down pad it")
    return shape


def pack_lora_up(up: torch.Tensor, name: str = "lora_up") -> torch.Tensor:
    """lora_up [N, R] (fp16/bf16; N, R multiples of 16; the checkpoint pads N to 128, pad_lora_up) -> [N, R] in
    16x16 fragment order."""
    n, r = _check_lora(up, name, "N", "R")
    x = up.reshape(n // 16, 2, 8, r // 16, 2, 4, 2).permute(_UP_ORDER)
    return x.reshape(n, r).contiguous()


def unpack_lora_up(packed: torch.Tensor, name: str = "lora_up") -> torch.Tensor:
    """The exact inverse of pack_lora_up: packed [N, R] -> [N, R]."""
    n, r = _check_lora(packed, name, "N", "R")
    x = packed.reshape(n // 16, r // 16, 8, 4, 2, 2, 2).permute(_inverse(_UP_ORDER))
    return x.reshape(n, r).contiguous()


def pack_lora_down(down: torch.Tensor, name: str = "lora_down") -> torch.Tensor:
    """lora_down [R, K] (fp16/bf16; the rank rows of the low-rank branch, R and K multiples of 16; the checkpoint pads
    K to 128, pad_lora_down) -> [K, R], K-block-major 16x16 fragments (Nunchaku's stored shape)."""
    r, k = _check_lora(down, name, "R", "K")
    x = down.reshape(r // 16, 2, 8, k // 16, 2, 4, 2).permute(_DOWN_ORDER)
    return x.reshape(k, r).contiguous()


def unpack_lora_down(packed: torch.Tensor, name: str = "lora_down") -> torch.Tensor:
    """The exact inverse of pack_lora_down: packed [K, R] -> [R, K]."""
    k, r = _check_lora(packed, name, "K", "R")
    x = packed.reshape(k // 16, r // 16, 8, 4, 2, 2, 2).permute(_inverse(_DOWN_ORDER))
    return x.reshape(r, k).contiguous()
