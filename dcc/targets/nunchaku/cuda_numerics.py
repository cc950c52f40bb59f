"""The numerics of dcc's W4A4 CUDA kernels (csrc/w4a4) for Nunchaku INT4 and NVFP4 layers, emulated bit for bit in
torch (on any device): the activation codes and scales are dcc.ir.w4a4.quantize_act_int4's / quantize_act_nvfp4's
(the kernel matches them); the low-rank down-projection, the fp32 group accumulation and the epilogue are the
kernel's own order, each fp32 step rounded once as the GPU's fma / mul / add do. Also the exact result of the stored
codes and scales (float64) and the relative errors against it, which the issue's target (below 1e-3) is about.

These numerics differ from Nunchaku's own (reference.py: half2 group accumulation, 16-bit bias add): fp32 throughout,
one rounding to 16 bits at the end (csrc/w4a4/DESIGN.md)."""
from __future__ import annotations

import torch

from ...ir.fp_formats import fp_decode
from ...ir.w4a4 import (INT4_GROUP, NVFP4_GROUP, SHIFT_GELU, compute_dtype, quantize_act_int4, quantize_act_nvfp4,
                        to_dtype)

# ------------------------------------------------------------------------------------- exact fp32 steps in float64


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s + err == a + b exactly (Knuth's TwoSum, float64); err 0 where s is not finite."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, torch.where(torch.isfinite(s), err, torch.zeros_like(err))


def round_f32(s: torch.Tensor, err: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 round-to-nearest-even of the exact value s + err (s float64, |err| <= half an ulp of s as TwoSum
    gives it), float32 out. The cast s -> float32 is one RNE of s; it differs from the rounding of s + err only where s
    lies exactly halfway between two float32 values and err != 0: then err decides."""
    t = s.to(torch.float32)
    if err is None:
        return t
    rem = s - t.to(torch.float64)                                   # exact
    toward = torch.where(rem > 0, torch.full_like(t, float("inf")), torch.full_like(t, float("-inf")))
    u = torch.nextafter(t, toward)                                  # the other neighbour of s
    mid = (t.to(torch.float64) + u.to(torch.float64)) * 0.5         # exact: two adjacent float32 values
    tie = (rem != 0) & (s == mid) & torch.isfinite(t) & torch.isfinite(u)
    beyond = tie & (err != 0) & ((err > 0) == (rem > 0))            # the true value is past the midpoint, toward u
    return torch.where(beyond, u, t)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fmaf(a, b, c) (one rounding) for float32 values a, b, c: the product is exact in float64 (48 bits), the sum's
    remainder is kept by TwoSum, so the single rounding is exact. float32 out."""
    prod = a.to(torch.float64) * b.to(torch.float64)
    s, err = _two_sum(prod, c.to(torch.float64))
    return round_f32(s, err)


def mul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fl32(a * b) (__fmul_rn) for float32 values: the float64 product is exact, then one RNE."""
    return (a.to(torch.float64) * b.to(torch.float64)).to(torch.float32)


def add_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fl32(a + b) (__fadd_rn): torch's own float32 add is that single RNE (IEEE, subnormals kept on the CPU)."""
    return a.to(torch.float32) + b.to(torch.float32)


# ------------------------------------------------------------------------------------------------- the kernels

def lora_down_act(x16: torch.Tensor, lora_down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quant_act's low-rank down-projection [M, R] fp32 of the raw 16-bit x [M, K] and lora_down [R, K]: per 64-k
    group g and rank r, p = fma chain over the group's k in order from +0; then lora_act = the fp32 sum of the
    partials in group order from +0."""
    x = to_dtype(x16, dtype).to(torch.float32)
    d = to_dtype(lora_down, dtype).to(torch.float32)
    m, k = x.shape
    r = d.shape[0]
    groups = k // INT4_GROUP
    xg = x.view(m, groups, INT4_GROUP)
    dg = d.view(r, groups, INT4_GROUP).permute(1, 2, 0)             # [G, 64, R]
    part = torch.zeros(m, groups, r, dtype=torch.float32, device=x.device)
    for j in range(INT4_GROUP):
        part = fma_f32(xg[:, :, j].unsqueeze(-1), dg[:, j].unsqueeze(0), part)
    acc = torch.zeros(m, r, dtype=torch.float32, device=x.device)
    for g in range(groups):
        acc = add_f32(acc, part[:, g])
    return acc


def group_accumulate(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """The GEMM's main branch [M, N] in fp32: acc = +0; per 64-k group in k order acc = fma(float(psum), s, acc) with
    psum the exact integer group sum and s = fl32(ascale[m, g] * wscale[n, g])."""
    m, k = acodes.shape
    n = wcodes.shape[0]
    groups = k // INT4_GROUP
    a = acodes.to(torch.float64).view(m, groups, INT4_GROUP)
    w = wcodes.to(torch.float64).view(n, groups, INT4_GROUP)
    asc = ascales.to(torch.float32)
    wsc = to_dtype(wscales, dtype).to(torch.float32)
    acc = torch.zeros(m, n, dtype=torch.float32, device=acodes.device)
    for g in range(groups):
        psum = (a[:, g] @ w[:, g].T).to(torch.float32)             # exact integers (|psum| < 2^13)
        s = mul_f32(asc[:, g:g + 1], wsc[:, g].view(1, n))
        acc = fma_f32(psum, s, acc)
    return acc


def epilogue(acc: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None,
             lora_act: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
             fp32_out: bool = False, alpha: float | None = None,
             wcscales: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 acc [M, N] (NVFP4: times alpha, then times wcscales[n], each one fp32 rounding) + bias (one fp32 add;
    skipped without a bias), then fma(lora_act[m, r], up[n, r], acc) over the ranks in order, then one RNE to dtype
    (float32 -> 16 bits is torch's single RNE); fp32_out: the fp32 value before that rounding (to measure the
    accumulation's own error)."""
    acc = acc.to(torch.float32)
    n = acc.shape[1]
    if alpha is not None:
        acc = mul_f32(acc, torch.tensor(float(alpha), dtype=torch.float32, device=acc.device))
    if wcscales is not None:
        acc = mul_f32(acc, to_dtype(wcscales, dtype).to(torch.float32).view(1, n))
    if bias is not None:
        acc = add_f32(acc, to_dtype(bias, dtype).to(torch.float32).view(1, n))
    if lora_up is not None and lora_up.shape[1] > 0:
        la = lora_act.to(torch.float32)
        up = to_dtype(lora_up, dtype).to(torch.float32)
        for r in range(up.shape[1]):
            acc = fma_f32(la[:, r:r + 1], up[:, r].view(1, n), acc)
    return acc if fp32_out else acc.to(dtype)


def _rank(lora_down, lora_up) -> int:
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up go together")
    return 0 if lora_down is None else int(lora_down.shape[0])


def w4a4_int4_linear_cuda(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                          smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                          lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                          unsigned: bool = False, dtype: torch.dtype | None = None,
                          fp32_out: bool = False) -> torch.Tensor:
    """y [..., N] in the 16-bit dtype, as dcc's W4A4 kernels compute it for x [..., K] (the arguments as
    reference.w4a4_int4_linear's: wcodes [N, K] in [-8, 7], wscales [N, K/64], smooth [K], lora_down [R, K],
    lora_up [N, R], bias [N]; unsigned: an after-GELU layer, quantized (x + SHIFT_GELU) / smooth as u4).
    fp32_out: the fp32 result before the final rounding (what the kernel holds in registers)."""
    dtype = compute_dtype(x, dtype)
    k = x.shape[-1]
    n = wcodes.shape[0]
    x16 = to_dtype(x.reshape(-1, k), dtype)
    act = quantize_act_int4(x16, smooth, INT4_GROUP, unsigned, dtype)
    acc = group_accumulate(act.codes, act.scales, wcodes, wscales, dtype)
    rank = _rank(lora_down, lora_up)
    lora_act = lora_down_act(x16, lora_down, dtype) if rank else None
    y = epilogue(acc, dtype, bias, lora_act, lora_up if rank else None, fp32_out)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------- NVFP4

def e4m3_values(scales: torch.Tensor) -> torch.Tensor:
    """e4m3 micro-scales (float8_e4m3fn, or their uint8 bytes) as float32 values (exact)."""
    return (scales.view(torch.float8_e4m3fn) if scales.dtype == torch.uint8 else scales).to(torch.float32)


def nvfp4_group_accumulate(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor,
                           wscales: torch.Tensor) -> torch.Tensor:
    """gemm_nvfp4's main branch [M, N] in fp32 before alpha: acc = +0; per 16-k group in k order
    acc = fma(float(psum2), fl32(ascale * wscale) / 4, acc), psum2 the exact integer sum of the doubled e2m1 values'
    products (e2m1 patterns in, e4m3 micro-scales [M / N, K/16])."""
    m, k = acodes.shape
    n = wcodes.shape[0]
    groups = k // NVFP4_GROUP
    a = (fp_decode(acodes, "fp4_e2m1").to(torch.float64) * 2).view(m, groups, NVFP4_GROUP)
    w = (fp_decode(wcodes, "fp4_e2m1").to(torch.float64) * 2).view(n, groups, NVFP4_GROUP)
    asc, wsc = e4m3_values(ascales), e4m3_values(wscales)
    acc = torch.zeros(m, n, dtype=torch.float32, device=acodes.device)
    for g in range(groups):
        psum = (a[:, g] @ w[:, g].T).to(torch.float32)             # exact integers (|psum| <= 16 * 144)
        s = mul_f32(asc[:, g:g + 1], wsc[:, g].view(1, n)) * 0.25  # exact: e4m3 products, a power of two
        acc = fma_f32(psum, s, acc)
    return acc


def w4a4_nvfp4_linear_cuda(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                           smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                           lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                           wtscale: float = 1.0, wcscales: torch.Tensor | None = None,
                           dtype: torch.dtype | None = None, fp32_out: bool = False) -> torch.Tensor:
    """y [..., N] in the 16-bit dtype, as dcc's NVFP4 kernels compute it for x [..., K] (the arguments as
    reference.w4a4_nvfp4_linear's: wcodes [N, K] e2m1 patterns, wscales [N, K/16] e4m3, wtscale the per-tensor
    alpha, wcscales [N])."""
    dtype = compute_dtype(x, dtype)
    k = x.shape[-1]
    n = wcodes.shape[0]
    x16 = to_dtype(x.reshape(-1, k), dtype)
    act = quantize_act_nvfp4(x16, smooth, NVFP4_GROUP, dtype)
    acc = nvfp4_group_accumulate(act.codes, act.scales, wcodes, wscales)
    rank = _rank(lora_down, lora_up)
    lora_act = lora_down_act(x16, lora_down, dtype) if rank else None
    y = epilogue(acc, dtype, bias, lora_act, lora_up if rank else None, fp32_out, alpha=wtscale, wcscales=wcscales)
    return y.reshape(*x.shape[:-1], n)


def exact_nvfp4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                       smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                       lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                       wtscale: float = 1.0, wcscales: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """The exact result [M, N] (float64) of the NVFP4 codes and scales: (e2m1 * e4m3 activations) @ (e2m1 * e4m3
    weights)^T * fl32(alpha) * wcscales + bias + the low-rank branch on the raw x."""
    dtype = compute_dtype(x, dtype)
    x16 = to_dtype(x.reshape(-1, x.shape[-1]), dtype)
    act = quantize_act_nvfp4(x16, smooth, NVFP4_GROUP, dtype)
    m, k = act.codes.shape
    n = wcodes.shape[0]
    g = k // NVFP4_GROUP
    a = fp_decode(act.codes, "fp4_e2m1").to(torch.float64).view(m, g, NVFP4_GROUP)
    a = (a * e4m3_values(act.scales).to(torch.float64).unsqueeze(-1)).reshape(m, k)
    w = fp_decode(wcodes, "fp4_e2m1").to(torch.float64).view(n, g, NVFP4_GROUP)
    w = (w * e4m3_values(wscales).to(torch.float64).unsqueeze(-1)).reshape(n, k)
    y = (a @ w.T) * float(torch.tensor(float(wtscale), dtype=torch.float32))
    if wcscales is not None:
        y = y * to_dtype(wcscales, dtype).to(torch.float64).view(1, n)
    if bias is not None:
        y = y + to_dtype(bias, dtype).to(torch.float64).view(1, n)
    if lora_down is not None and lora_down.shape[0] > 0:
        la = x16.to(torch.float64) @ to_dtype(lora_down, dtype).to(torch.float64).T
        y = y + la @ to_dtype(lora_up, dtype).to(torch.float64).T
    return y


# --------------------------------------------------------------------------------------------- exact and errors

def exact_linear(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                 dtype: torch.dtype, bias: torch.Tensor | None = None, x16: torch.Tensor | None = None,
                 lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None) -> torch.Tensor:
    """The exact result [M, N] (float64) of the stored codes and scales: sum_g psum_g * ascale * wscale (exact: the
    products have at most 13 + 22 bits and the sums stay far inside float64 for realistic K) + bias + (x @ down^T)
    @ up^T (the low-rank branch on the raw 16-bit x, float64)."""
    m, k = acodes.shape
    n = wcodes.shape[0]
    groups = k // INT4_GROUP
    a = acodes.to(torch.float64).view(m, groups, INT4_GROUP) * ascales.to(torch.float64).unsqueeze(-1)
    w = wcodes.to(torch.float64).view(n, groups, INT4_GROUP) * to_dtype(wscales, dtype).to(torch.float64).unsqueeze(-1)
    y = a.reshape(m, k) @ w.reshape(n, k).T
    if bias is not None:
        y = y + to_dtype(bias, dtype).to(torch.float64).view(1, n)
    if lora_down is not None and lora_down.shape[0] > 0:
        la = to_dtype(x16, dtype).to(torch.float64) @ to_dtype(lora_down, dtype).to(torch.float64).T
        y = y + la @ to_dtype(lora_up, dtype).to(torch.float64).T
    return y


def exact_int4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
                      smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                      lora_up: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                      unsigned: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """exact_linear for x [M, K] with the activation codes and scales the kernels (and Nunchaku) make of it."""
    dtype = compute_dtype(x, dtype)
    x16 = to_dtype(x.reshape(-1, x.shape[-1]), dtype)
    act = quantize_act_int4(x16, smooth, INT4_GROUP, unsigned, dtype)
    return exact_linear(act.codes, act.scales, wcodes, wscales, dtype, bias, x16, lora_down, lora_up)


def relative_error(y: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """How far y is from the exact result: max |y - exact| / max |exact| ("max") and ||y - exact|| / ||exact||
    ("norm"), both in float64 on the CPU (y may come from the GPU), over the entries where both are finite (an fp16
    output beyond 65504 is inf: outside the format, not an error of the arithmetic)."""
    y, exact = y.detach().cpu().to(torch.float64), exact.detach().cpu().to(torch.float64)
    keep = torch.isfinite(y) & torch.isfinite(exact)
    y, exact = y[keep], exact[keep]
    d = (y - exact).abs()
    scale = exact.abs().max().clamp_min(1e-300)
    return {"max": float(d.max() / scale) if d.numel() else 0.0,
            "norm": float(d.norm() / exact.norm().clamp_min(1e-300)) if d.numel() else 0.0}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their common 16-bit dtype (fp16 or bf16), through the ordered integer
    image of the bit patterns; int64."""
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"ulp_distance compares two tensors of one 16-bit dtype, got {a.dtype} and {b.dtype}")

    def ordered(t):
        v = t.contiguous().view(torch.int16).to(torch.int64)
        return torch.where(v >= 0, v, -(v & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


__all__ = ["SHIFT_GELU", "add_f32", "e4m3_values", "epilogue", "exact_int4_linear", "exact_linear",
           "exact_nvfp4_linear", "fma_f32", "group_accumulate", "lora_down_act", "mul_f32", "nvfp4_group_accumulate",
           "relative_error", "round_f32", "ulp_distance", "w4a4_int4_linear_cuda", "w4a4_nvfp4_linear_cuda"]
