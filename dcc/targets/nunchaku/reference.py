"""CPU reference of Nunchaku's W4A4 linear (SVDQuant: a 4-bit main branch plus a 16-bit low-rank branch), computing
from unpacked tensors what the GPU kernels compute, in the kernels' order and rounding (research/targets.md 3A).

Follows nunchaku-ai/nunchaku @ 92e4695 (src/kernels identical to mit-han-lab/nunchaku @ 4132b3b):
  - activation quantization: dcc/ir/w4a4.py (quantize_w4a4_act_fuse_lora / fc1's fused EpilogueQuantize);
  - INT4 main branch: gemm_w4a4.cuh gemm_w4a4_block with USE_FP32_ACCUM = false, gemm_base.cuh apply_scales:
    per 64-k group the exact int32 mma result psum is converted to 16 bits (__int2float_rn, then RNE), multiplied by
    __hmul2(ascale, wscale) (16-bit product) and accumulated with __hfma2 (one rounding) into a 16-bit accumulator
    that starts at 0, group by group in k order;
  - NVFP4 main branch: gemm_w4a4_fp4_block: block-scaled e2m1 mma accumulating in fp32, one 64-k mma at a time,
    then fp32 * alpha (wtscale, only applied when != 1), then the fp32 -> 16-bit RNE;
  - epilogues, in the order gemm_w4a4_launch_impl.cuh chains them (launch_bias wraps launch_lora): EpilogueBias
    first (16-bit: __hadd2 with bias; __hfma2(acc, wcscales, bias) or __hmul2 when per-channel scales are given),
    then EpilogueLoraUp (lora.cuh: acc widened to fp32, lora_act * lora_scales[r / 16] rounded to 16 bits, mma
    f16 x f16 -> f32 over 16-rank tiles in order, the fp32 sum rounded to 16 bits), then EpilogueDefault (fp16 only:
    clamp to +-65504 with __hmin/__hmax, which also maps inf to 65504 and NaN to 65504);
  - LoRA down (lora.cuh EpilogueLoraDown, run by the quantize kernel on the RAW 16-bit x, before the shift and the
    division by smooth): mma f16 x f16 -> f32 in 16-k tiles within each 128-column block, blocks combined with
    red.global.add.f32.

Exact here: the activation codes/scales (up to rcp.approx, see dcc/ir/w4a4.py), the int32 dot products, every 16-bit
rounding of the INT4 accumulation and the epilogue (so the INT4 main branch with bias and no LoRA is bit-exact).
Modelled, not bit-exact: inside a tensor-core mma with fp32 accumulation (LoRA tiles, NVFP4 steps) the sum is taken
exactly and rounded once to fp32 per instruction -- the hardware's internal adder precision is undocumented -- and
the LoRA-down blocks are added in k order, while the GPU's atomics add them in any order (runs differ by fp32 ulps).
"""
from __future__ import annotations

import torch
from torch import nn

from ...ir.formats import fp_decode
from ...ir.w4a4 import (INT4_GROUP, NVFP4_GROUP, SHIFT_GELU, add_exact, compute_dtype, fma_exact, mul_exact,
                        quantize_act_int4, quantize_act_nvfp4, round_exact, to_dtype)

LORA_TILE = 16          # mma.m16n8k16: the k of one low-rank mma (rank tiles in LoRA up, input tiles in LoRA down)
LORA_DOWN_BLOCK = 128   # BLOCK_N of the quantize kernel: one CTA's columns, reduced with red.global.add.f32
NVFP4_MMA_K = 64        # mma.m16n8k64 ... scale_vec::4X: four 16-k micro-scale groups per instruction
FP16_OUT_MAX = 65504.0


# -------------------------------------------------------------------------------------------- building blocks

def _fp32_mma_chain(a: torch.Tensor, b: torch.Tensor, tile: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """sum over k-tiles of a[:, t] @ b[:, t]^T added into an fp32 accumulator, one rounding per tile (the model of an
    mma with fp32 accumulation); a [M, K], b [N, K] hold 16-bit (or other exactly representable) values. float64 out."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device) if acc is None else acc.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    for k0 in range(0, a.shape[1], tile):
        out = add_exact(out, a[:, k0:k0 + tile] @ b[:, k0:k0 + tile].T, torch.float32)
    return out


def lora_down_act(x16: torch.Tensor, lora_down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lora_act = x @ lora_down^T [M, R] in fp32 on the raw 16-bit x (no shift, no division by smooth), as the
    quantize kernel's EpilogueLoraDown computes it: 16-k mma tiles chained in fp32 within each 128-column block,
    then the blocks summed in fp32 (in k order here; by atomics in any order on the GPU). float32 out."""
    x, down = to_dtype(x16, dtype), to_dtype(lora_down, dtype)
    total = torch.zeros(x.shape[0], down.shape[0], dtype=torch.float64, device=x.device)
    for b0 in range(0, x.shape[1], LORA_DOWN_BLOCK):
        block = _fp32_mma_chain(x[:, b0:b0 + LORA_DOWN_BLOCK], down[:, b0:b0 + LORA_DOWN_BLOCK], LORA_TILE)
        total = add_exact(total, block, torch.float32)
    return total.to(torch.float32)


def int4_group_accumulate(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """The INT4 main branch [M, N] in dtype: acc = hfma2(half(psum_g), hmul2(ascale_g, wscale_g), acc) for each
    64-k group g in k order, acc starting at 0. psum_g is exact (|psum| <= 64 * 15 * 8 fits float64 matmul exactly);
    its conversion int -> fp32 is exact and fp32 -> 16 bits rounds (fp16 above 2048, bf16 above 256)."""
    m, k = acodes.shape
    n = wcodes.shape[0]
    groups = ascales.shape[1]
    gs = k // groups
    a = acodes.to(torch.float64).view(m, groups, gs)
    w = wcodes.to(torch.float64).view(n, groups, gs)
    asc, wsc = ascales.to(torch.float64), to_dtype(wscales, dtype).to(torch.float64)
    acc = torch.zeros(m, n, dtype=torch.float64, device=acodes.device)
    for g in range(groups):
        psum = a[:, g] @ w[:, g].T                                        # the s32 mma result, exact
        p16 = psum.to(torch.float32).to(dtype)                            # i2f_normal: __int2float_rn, then RNE
        s16 = mul_exact(asc[:, g:g + 1], wsc[:, g].view(1, n), dtype)     # __hmul2(ascale, wscale), one rounding
        acc = fma_exact(p16, s16, acc, dtype)                             # __hfma2: one rounding per group
    return acc.to(dtype)


def nvfp4_accumulate(avals: torch.Tensor, wvals: torch.Tensor, wtscale: float) -> torch.Tensor:
    """The NVFP4 main branch in fp32 (float64 holding fp32 values): decoded activations [M, K] and weights [N, K]
    (e2m1 value * e4m3 micro-scale, exact) accumulated one 64-k mma at a time into fp32 -- each instruction's sum is
    exact in float64 (12-bit products over an 18-binade scale range, 64 terms) and rounded once -- then * alpha."""
    acc = _fp32_mma_chain(avals, wvals, NVFP4_MMA_K)
    if wtscale != 1.0:                                                    # USE_ALPHA: fpsum *= alpha in fp32
        alpha = torch.tensor(wtscale, dtype=torch.float32).to(torch.float64)
        acc = mul_exact(acc, alpha, torch.float32)
    return acc


def epilogue(acc16: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None,
             wcscales: torch.Tensor | None = None, lora_act: torch.Tensor | None = None,
             lora_up: torch.Tensor | None = None, lora_scales: list[float] | None = None) -> torch.Tensor:
    """EpilogueBias, then EpilogueLoraUp, then EpilogueDefault, on the 16-bit main-branch result [M, N]."""
    acc = acc16.to(torch.float64)
    n = acc.shape[1]
    if wcscales is not None:
        wc = to_dtype(wcscales, dtype).to(torch.float64).view(1, n)
        if bias is not None:   # __hfma2(acc, wcscale, bias)
            acc = fma_exact(acc, wc, to_dtype(bias, dtype).to(torch.float64).view(1, n), dtype)
        else:                  # __hmul2(acc, wcscale)
            acc = mul_exact(acc, wc, dtype)
    elif bias is not None:     # __hadd2(acc, bias)
        acc = add_exact(acc, to_dtype(bias, dtype).to(torch.float64).view(1, n), dtype)
    if lora_up is not None and lora_up.shape[1] > 0:
        if lora_act is None:
            raise ValueError("lora_up needs lora_act (the LoRA-down activations)")
        act = lora_act.to(torch.float32)
        rank = act.shape[1]
        scales = torch.ones(rank, dtype=torch.float32, device=act.device)
        for t, s in enumerate(lora_scales or []):                       # one fp32 scale per 16 ranks
            scales[t * LORA_TILE:(t + 1) * LORA_TILE] = s
        act16 = (act * scales).to(dtype)                                # fp32 product, then one RNE to 16 bits
        up16 = to_dtype(lora_up, dtype)
        f32 = _fp32_mma_chain(act16, up16, LORA_TILE, acc=acc)          # acc16 widened to fp32 exactly
        acc = round_exact(f32, dtype)                                   # packed_fp32_to_fp16
    out = acc.to(dtype)
    if dtype == torch.float16:  # EpilogueDefault: __hmin(x, 65504) then __hmax(x, -65504); NaN gives 65504
        out = torch.where(torch.isnan(out), torch.full_like(out, FP16_OUT_MAX),
                          out.clamp(-FP16_OUT_MAX, FP16_OUT_MAX))
    return out


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, ...]):
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def _lora(x16, lora_down, lora_up, dtype, n: int, k: int):
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up go together")
    if lora_down is None:
        return None
    rank = lora_down.shape[0]
    _check_2d("lora_down", lora_down, (rank, k))
    _check_2d("lora_up", lora_up, (n, rank))
    return lora_down_act(x16, lora_down, dtype) if rank else None


# ----------------------------------------------------------------------------------------------- the linears

def w4a4_int4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                     smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                     lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                     unsigned: bool = False, dtype: torch.dtype | None = None,
                     lora_scales: list[float] | None = None, wcscales: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] in the 16-bit dtype, as Nunchaku's INT4 GEMM computes it for x [..., K].

    wcodes [N, K] integers in [-8, 7]; wscales [N, K/64]; smooth [K] (or None); lora_down [R, K], lora_up [N, R]
    (the unpacked low-rank factors; lora_down is the one the checkpoint stores, i.e. already divided by the smooth
    factor, since the kernel feeds the branch the raw x); bias [N]; wcscales [N] per-channel scales (INT4 checkpoints
    have none). unsigned=True is an `act_unsigned` layer (mlp_fc2): x is the GELU output, the main branch sees
    (x + SHIFT_GELU) / smooth as u4 codes, the low-rank branch the unshifted x, and bias must be the stored bias,
    which holds the shift compensation (bias - shift * rowsum of the main-branch weight in x's domain; DeepCompressor
    gets there via ShiftedLinear's b - W * shift plus convert.py's + lora_up @ lora_down @ shift).
    """
    dtype = compute_dtype(x, dtype)
    k = x.shape[-1]
    n = wcodes.shape[0]
    _check_2d("wcodes", wcodes, (n, k))
    _check_2d("wscales", wscales, (n, k // INT4_GROUP))
    if wcodes.numel() and (wcodes.min() < -8 or wcodes.max() > 7):
        raise ValueError("INT4 weight codes must lie in [-8, 7]")
    x16 = to_dtype(x.reshape(-1, k), dtype)
    act = quantize_act_int4(x16, smooth, INT4_GROUP, unsigned, dtype)
    acc = int4_group_accumulate(act.codes, act.scales, wcodes, wscales, dtype)
    lora_act = _lora(x16, lora_down, lora_up, dtype, n, k)
    y = epilogue(acc, dtype, bias, wcscales, lora_act, lora_up, lora_scales)
    return y.reshape(*x.shape[:-1], n)


def w4a4_nvfp4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                      smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                      lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                      wtscale: float = 1.0, wcscales: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                      lora_scales: list[float] | None = None) -> torch.Tensor:
    """y [..., N] in the 16-bit dtype, as Nunchaku's NVFP4 GEMM computes it for x [..., K].

    wcodes [N, K] e2m1 bit patterns (uint8, sign << 3 | magnitude index); wscales [N, K/16] e4m3 micro-scales
    (torch.float8_e4m3fn, or any float tensor of e4m3 values); wtscale the per-tensor alpha (a float, fp32 in the
    kernel); wcscales [N] 16-bit per-channel scales (the Python backend fills ones when absent). Activations are always
    signed for NVFP4 (the GELU shift is 0). smooth, LoRA and bias as for w4a4_int4_linear.
    """
    dtype = compute_dtype(x, dtype)
    k = x.shape[-1]
    n = wcodes.shape[0]
    _check_2d("wcodes", wcodes, (n, k))
    _check_2d("wscales", wscales, (n, k // NVFP4_GROUP))
    x16 = to_dtype(x.reshape(-1, k), dtype)
    act = quantize_act_nvfp4(x16, smooth, NVFP4_GROUP, dtype)
    wvals = decode_nvfp4_weight(wcodes, wscales)
    acc32 = nvfp4_accumulate(act.dequantize().to(torch.float64), wvals, wtscale)
    acc = round_exact(acc32, dtype).to(dtype)                           # packed_fp32_to_fp16
    lora_act = _lora(x16, lora_down, lora_up, dtype, n, k)
    y = epilogue(acc, dtype, bias, wcscales, lora_act, lora_up, lora_scales)
    return y.reshape(*x.shape[:-1], n)


def decode_int4_weight(wcodes: torch.Tensor, wscales: torch.Tensor) -> torch.Tensor:
    """codes * group scale [N, K] in float64 (exact)."""
    n, k = wcodes.shape
    g = wscales.shape[1]
    w = wcodes.to(torch.float64).view(n, g, k // g) * wscales.to(torch.float64).unsqueeze(-1)
    return w.reshape(n, k)


def decode_nvfp4_weight(wcodes: torch.Tensor, wscales: torch.Tensor) -> torch.Tensor:
    """e2m1 value * e4m3 micro-scale [N, K] in float64 (exact; wtscale and wcscales not applied)."""
    n, k = wcodes.shape
    g = wscales.shape[1]
    vals = fp_decode(wcodes, "fp4_e2m1").to(torch.float64).view(n, g, k // g)
    return (vals * wscales.to(torch.float64).unsqueeze(-1)).reshape(n, k)


# ------------------------------------------------------------------------------------------------ the module

class NunchakuLinear(nn.Linear):
    """One SVDQuant W4A4 linear as Nunchaku's kernels compute it (an nn.Linear subclass, so hooks that look for
    nn.Linear still see it), built from unpacked tensors; forward is w4a4_int4_linear / w4a4_nvfp4_linear.

    `weight` holds the float32 linear map the layer stands for in x's domain -- the decoded main branch divided by
    smooth (the stored weight is pre-multiplied by it) plus lora_up @ lora_down -- and `bias` the matching float32
    bias: the stored bias, plus SHIFT_GELU * rowsum(main branch / smooth) for an unsigned layer, whose stored bias
    holds the shift compensation. F.linear(x, weight, bias) is thus the unquantized approximation of forward(x).
    """

    def __init__(self, precision: str, wcodes: torch.Tensor, wscales: torch.Tensor,
                 smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                 lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, unsigned: bool = False,
                 wtscale: float = 1.0, wcscales: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 lora_scales: list[float] | None = None):
        nn.Module.__init__(self)
        if precision not in ("int4", "nvfp4"):
            raise ValueError(f"precision must be 'int4' or 'nvfp4', got {precision!r}")
        if precision == "nvfp4" and unsigned:
            raise ValueError("NVFP4 activations are always signed (the GELU shift is 0 for FP4)")
        self.precision, self.unsigned, self.dtype = precision, unsigned, compute_dtype(wscales, dtype)
        self.out_features, self.in_features = wcodes.shape
        self.wtscale, self.lora_scales = float(wtscale), lora_scales
        self.register_buffer("wcodes", wcodes.clone())
        self.register_buffer("wscales", wscales.clone())
        for name, t in (("smooth", smooth), ("lora_down", lora_down), ("lora_up", lora_up),
                        ("wcscales", wcscales), ("stored_bias", bias)):
            self.register_buffer(name, None if t is None else to_dtype(t, self.dtype))
        if precision == "int4":
            main = decode_int4_weight(wcodes, wscales)
        else:
            main = decode_nvfp4_weight(wcodes, wscales) * torch.tensor(self.wtscale, dtype=torch.float32).double()
            if wcscales is not None:
                main = main * self.wcscales.to(torch.float64).view(-1, 1)
        if smooth is not None:
            main = main / self.smooth.to(torch.float64).view(1, -1)
        w = main if lora_down is None else main + self.lora_up.double() @ self.lora_down.double()
        self.weight = nn.Parameter(w.to(torch.float32), requires_grad=False)
        b = None if bias is None else self.stored_bias.to(torch.float64)
        if unsigned:
            shift = SHIFT_GELU * main.sum(1)
            b = shift if b is None else b + shift
        self.bias = None if b is None else nn.Parameter(b.to(torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(dtype=self.dtype, lora_scales=self.lora_scales, wcscales=self.wcscales)
        args = (x, self.wcodes, self.wscales, self.smooth, self.lora_down, self.lora_up, self.stored_bias)
        if self.precision == "int4":
            y = w4a4_int4_linear(*args, unsigned=self.unsigned, **kw)
        else:
            y = w4a4_nvfp4_linear(*args, wtscale=self.wtscale, **kw)
        return y.to(x.dtype)
