"""Nunchaku's AWQ W4A16 layout: the linears Nunchaku keeps in W4A16 (AdaNorm / modulation, e.g. FLUX `norm1.linear`,
`norm.linear`, Qwen-Image `img_mod.1`; Python class AWQW4A16Linear, C++ GEMV_AWQ) with tensors `qweight`, `wscales`,
`wzeros` (and a plain `bias`).

The nibble placement is TinyChat's "v2" layout (dcc.targets.common.awq_layout, research/targets.md 2A), which this
module reuses rather than repeats; it differs from a TinyChat checkpoint only in how the tensors are stored:
  - qweight is int32 [N/4, K/2]: the same bytes as TinyChat's int16 [N/4, K] qweight, two int16 words per int32,
    little endian (int32 word c = int16 word 2c in bits 0..15, word 2c+1 in bits 16..31).
  - the group size is 64, the only one gemv_awq takes (it asserts group_size == 64, and batch M <= 8).
  - wscales and wzeros are [K/64, N] with no padding rows (TinyChat pads them to a multiple of 16 rows for G = 64).
    wzeros is TinyChat's scaled_zeros, -(z*s): the kernel computes w = hfma2(q, s, wzeros) with unsigned q in 0..15.
  - the GEMV grid has N / 8 blocks (N_PER_BLOCK 2 x interleave 4), so N must be a multiple of 8.

Source read: nunchaku-ai/nunchaku @ 92e46957: nunchaku/models/linear.py (AWQW4A16Linear: qweight int32
(N/4, K/2), wscales/wzeros (K/G, N), group_size 64), src/Linear.cpp (GEMV_AWQ allocates qweight {N/4, ceil(K/8)*4},
wscales/wzeros {ceil(K/64), N}), src/kernels/awq/gemv_awq.cu and dequantize.cuh (the TRT-LLM/TinyChat GEMV: 4-row x
64-k interleave, lop3/0x6400 unsigned dequant, scales[g*N + n], zeros added by hfma2). The checkpoints are written by
mit-han-lab/deepcompressor @ 69f3473 backend/nunchaku/utils.py convert_to_nunchaku_w4x16_linear_weight: TinyChat's
pack_w4 then .view(torch.int32), PreScale zero 7 (wzeros = -7*s). Its TinyChat helper pads the scale rows to a
multiple of 16, which Nunchaku's [K/64, N] allocation does not have; DeepCompressor only converted FLUX (K = 3072,
48 groups, already a multiple of 16), so both agree there. The AdaNorm row interleave by splits and the +1 folded into
the bias are conversion steps, not layout, and are not done here."""
from __future__ import annotations

import torch

from ..common import awq_layout as awq

GROUP_SIZE = 64    # gemv_awq's only group size
DEFAULT_ZERO = 7   # DeepCompressor's zero point for these layers (codes 0..15 around 7); the format allows any zero
N_MULTIPLE = 8     # GEMV grid: N / (N_PER_BLOCK 2 * K_INTERLEAVE 4) blocks
K_MULTIPLE = awq.KSTRIDE  # 64-k interleave blocks (= the group size)


class LayoutError(ValueError):
    """A tensor that Nunchaku's AWQ W4A16 layout cannot hold; the message names the tensor, its shape and the
    problem."""


def check_shape(name: str, out_features: int, in_features: int) -> None:
    """Raise LayoutError naming `name` and every violated rule: N % 8 == 0 (GEMV grid), K % 64 == 0 (interleave
    blocks and the group size 64)."""
    n, k = out_features, in_features
    problems = []
    if n <= 0 or k <= 0:
        problems.append(f"shape [{n}, {k}] is empty")
    if n % N_MULTIPLE:
        problems.append(f"out_features {n} is not a multiple of {N_MULTIPLE} (gemv_awq runs N / 8 blocks)")
    if k % K_MULTIPLE:
        problems.append(f"in_features {k} is not a multiple of {K_MULTIPLE} (64-k blocks, group size 64)")
    if problems:
        raise LayoutError(f"{name}: " + "; ".join(problems))


def pack_qweight(codes: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """Unsigned codes [N, K] (0..15) -> int32 qweight [N/4, K/2]: TinyChat's int16 qweight, int16 words 2c and 2c+1
    joined into int32 word c (low half first, as the little-endian .view(torch.int32) the converter does)."""
    if codes.dim() != 2:
        raise LayoutError(f"{name} codes must be [N, K], got shape {tuple(codes.shape)}")
    check_shape(f"{name} codes of shape {tuple(codes.shape)}", codes.shape[0], codes.shape[1])
    u16 = awq.pack_qweight(codes).to(torch.int64) & 0xFFFF       # [N/4, K], 16-bit patterns
    word = u16[:, 0::2] | (u16[:, 1::2] << 16)                         # 0 .. 2^32 - 1
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)        # the same 32 bits as int32
    return word.to(torch.int32).contiguous()


def unpack_qweight(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """int32 qweight [N/4, K/2] -> int16 codes [N, K] (0..15), the exact inverse of pack_qweight."""
    if qweight.dtype != torch.int32:
        raise LayoutError(f"{name} must be int32, got {qweight.dtype} with shape {tuple(qweight.shape)}")
    if qweight.dim() != 2:
        raise LayoutError(f"{name} must be [N/4, K/2], got shape {tuple(qweight.shape)}")
    n4, half_k = qweight.shape
    check_shape(f"{name} of shape {tuple(qweight.shape)}", 4 * n4, 2 * half_k)
    word = qweight.to(torch.int64) & 0xFFFFFFFF
    halves = torch.stack((word & 0xFFFF, word >> 16), dim=-1).reshape(n4, 2 * half_k)  # int16 words 2c, 2c+1
    i16 = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
    return awq.unpack_qweight(i16)


def pack_scales(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                float_zero: bool = False, name: str = "wscales") -> tuple[torch.Tensor, torch.Tensor]:
    """scale [N, G] (values already in dtype) and integer zero points [N, G] -> (wscales [G, N], wzeros [G, N]) in
    dtype, G = K/64 rows and no padding: TinyChat's pack_scales (group-major transpose, wzeros = -(s*z) rounded once)
    without its padding rows. float_zero: `zero` already is the additive offset, stored as is."""
    if scale.dim() != 2:
        raise LayoutError(f"{name} scale must be [N, G], got shape {tuple(scale.shape)}")
    n, g = scale.shape
    if n % N_MULTIPLE or g <= 0:
        raise LayoutError(f"{name} scale of shape {tuple(scale.shape)}: N must be a positive multiple of "
                          f"{N_MULTIPLE} and G >= 1")
    wscales, wzeros = awq.pack_scales(scale, zero, GROUP_SIZE, dtype=dtype, float_zero=float_zero)
    return wscales[:g].contiguous(), wzeros[:g].contiguous()


def unpack_scales(wscales: torch.Tensor, wzeros: torch.Tensor,
                  name: str = "wscales") -> tuple[torch.Tensor, torch.Tensor]:
    """(wscales [G, N], wzeros [G, N]) -> (scale [N, G], wzeros [N, G]), the exact inverse of pack_scales (the zeros
    come back as the stored -(s*z))."""
    if wscales.dim() != 2 or tuple(wscales.shape) != tuple(wzeros.shape):
        raise LayoutError(f"{name} and wzeros must both be [G, N], got {tuple(wscales.shape)} and "
                          f"{tuple(wzeros.shape)}")
    return awq.unpack_scales(wscales, wzeros, wscales.shape[0])
