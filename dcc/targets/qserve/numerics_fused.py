"""QServe's activation quantization where its engine fuses it with the op before (mit-han-lab/qserve de6a2ec, built with
--use_fast_math as kernels/setup.py does; the instruction order below is the sm_90 SASS that nvcc 13.0 makes of it).
Which kernel quantizes which input (qserve/modeling/models/llama_w4a8_unpad.py and llama_w8a8_unpad.py):
  qkv_proj, gate_up_proj  <- RMSNormGeneral (layers/layernorm.py): layernorm_ops.rms_norm_general_fuse_sum (W4A8 per
                             channel, act_sum) or rms_norm_general (g128, W8A8), fused norm + per-token quantization;
  down_proj               <- SiluAndMulQuant (layers/activation.py), which does NOT fuse: activation_ops.silu_and_mul
                             writes fp16, then the standalone quant_kernel[_fuse_sum] (numerics.py) quantizes it;
  o_proj                  <- the standalone quant_kernel[_fuse_sum] (numerics.py).

1. rms_norm_general[_fuse_sum] (kernels/csrc/layernorm_kernels.cu) launches generalLayerNorm[_fuse_sum]<half, at::Half,
   USE_DIFF_OF_SQUARES=false> with beta = nullptr and use_shmem = false: TRT-LLM's LAYER norm without bias -- the mean
   IS subtracted, unlike the model's RMSNorm (mit-han-lab/omniserve issues #32 and #61, open). One CTA per token, B =
   32 * ceil(min(H, 1024) / 32) threads; thread t visits i = t, t + B, ... in order. x fp16 [H], gamma fp16, eps fp32:
   a. s_t = FADD(x_i, s_t) from 0; S = blockReduceSum(s_t) (numerics.block_sum); thread 0: mean = FMUL(S, MUFU.RCP(H)).
   b. d_i = FADD(x_i, -mean); v_t = FFMA(d_i, d_i, v_t) from 0 (ptxas contracts `+= diff * diff`); V = blockReduceSum;
      thread 0: rs = MUFU.RSQ(FFMA(V, MUFU.RCP(H), eps)) (rsqrtf; `/ hidden_dim + eps` contracted to one FFMA).
   c. y_i = FMUL(FMUL(d_i, rs), gamma_i) in float32; h_i = F2FP(y_i) (fp16, nearest even). Per thread: amax_t =
      max (HSETP2.GT) of |h_i| from fp16(1e-6f) = 17 * 2^-24; the fuse_sum variant also sums sum_t = HADD(sum_t, h_i)
      from +0 in fp16 (`T_scalar sum`: `sum += float` resolves to __half's operator+=, one fp16 rounding per add).
      A = blockAllReduceMax(float(amax_t)); S16 = blockAllReduceSum(float(sum_t)) (the same float32 butterflies).
   d. codes_i = F2I.S8 (cvt.rni.sat.s8: nearest even, saturating, NaN -> 0) of FMUL(FMUL(MUFU.RCP(A), 127), y_i),
      with y_i recomputed in float32 (use_shmem is false): the codes see y, while A and the sum saw its fp16 rounding.
   e. scale = F2FP(FMUL(A, fp32(1/127))); sum = F2FP(S16) (fuse_sum only).
2. silu_and_mul_kernel<at::Half> (kernels/csrc/activation_kernels.cu): grid = tokens, block = min(d, 1024), element
   by element (no reduction, so no order): g, u fp16;
      e = MUFU.EX2(FMUL(-g, fp32(log2 e)))           (expf under --use_fast_math: ex2.approx.ftz of x * log2 e)
      s = F2FP(FMUL(g, MUFU.RCP(FADD(e, 1))))        (the division: reciprocal, then multiply; silu() returns at::Half)
      out = F2FP(FMUL(s, u))                         (c10::Half's operator* multiplies in float32, then rounds)
   s * u is exact in float32 (11 x 11 significant bits), so out is the fp16 rounding of the exact product.
FTZ on these ops changes no fp16 result or code: no input is a float32 subnormal, and a result that flushes (below
2^-126) rounds to an fp16 zero, or to code 0 (|y| * 127 / A < 2^-99), of the same sign either way.

MUFU.RCP, MUFU.RSQ and MUFU.EX2 (rcp/rsqrt/ex2.approx) are approximate, within a few ulp, and not specified bit for
bit: the correctly rounded float32 result stands in for each here (the reciprocal: a float64 division rounded once to
float32, which is correctly rounded; rsqrt and exp2: float64, then rounded, correct unless float64 lands within 2^-28
ulp of a float32 tie). MUFU.RCP(H) is taken to be exact for H a power of two (as the stand-in is). What the
stand-ins can change, counted by bench/qserve_fused_stand_ins.py on 4096 tokens x 4096 channels (normal, 8 outlier
channels x 40, per-token offsets; gate 2 N(0, 1), up N(0, 1)) over every choice of moves of RSQ and EX2 by up to 2 ulp
and of each RCP by up to 1 ulp: rms_norm_general_fuse_sum: at most 5 of 16,777,216 codes and 0 of 4,096 scales
differ, but 2,243 of 4,096 per-token sums (one rounding of y to fp16 flips, and the fp16 sum moves by an ulp);
with H = 5120 and MUFU.RCP(H) moved by 1 ulp too: 40 of 20,971,520 codes, 4 scales, 2,948 sums. silu_and_mul: 4,318
of 16,777,216 fp16 outputs, and 3 of its 16,777,216 down_proj codes (standalone kernel) differ. So on the GPU at
most about 1 code in 3 million (norm) / 5 million (SiLU) can differ from this emulation, while the fused norm's
per-token sum can be an fp16 ulp off on about half the tokens (which moves the per-channel epilogue's s1_szeros * sum
term by that much). Measured on an H100 (csrc/w4a8/quant_fused.cu, which runs either the engine's MUFU instructions
or these stand-ins; tests/runtime/test_qserve_fused_cuda.py, 4096 x 4096, 2026-12-06): 1 of 16,777,216 codes, 0
scales and 148 of 4,096 sums of the norm, and 0 fp16 outputs of silu_and_mul, differ."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...ir.actquant import Int8Tokens
from ..common.rounding import fma_f32, round_once
from .numerics import WARP, block_sum

NORM_THREADS = 1024
AMAX_START = 17 * 2.0 ** -24           # fp16(1e-6f): where each thread's amax starts (T_scalar amax = 1e-6f)
LOG2E = 1.4426950216293335             # fp32(log2 e), the FMUL constant of __expf
INV127 = 0.007874015718698502          # fp32(1 / 127): `amax / 127.f` is folded to a multiply


class NormQuant(NamedTuple):
    """What rms_norm_general[_fuse_sum] computes per token: codes int8-valued [T, H] (float32), scale fp16 [T, 1],
    sum fp16 [T, 1], and the normed values y (float32, before the fp16 rounding) and h = fp16(y)."""
    codes: torch.Tensor
    scale: torch.Tensor
    sum: torch.Tensor
    y: torch.Tensor
    h: torch.Tensor


def rcp(v: torch.Tensor) -> torch.Tensor:
    """MUFU.RCP stand-in: the correctly rounded float32 1 / v (float64 division, one rounding after it)."""
    return (1.0 / v.to(torch.float64)).to(torch.float32)


def rsqrt(v: torch.Tensor) -> torch.Tensor:
    """MUFU.RSQ stand-in: float32 1 / sqrt(v) (sqrt and division in float64, then rounded once to float32)."""
    return (1.0 / torch.sqrt(v.to(torch.float64))).to(torch.float32)


def ex2(v: torch.Tensor) -> torch.Tensor:
    """MUFU.EX2 stand-in: float32 2^v (float64 exp2, then rounded to float32)."""
    return torch.exp2(v.to(torch.float64)).to(torch.float32)


def norm_threads(h: int) -> int:
    """rms_norm_general's block: min(H, 1024) threads rounded up to whole warps."""
    return WARP * -(-min(h, NORM_THREADS) // WARP)


def _per_thread(x: torch.Tensor, step, b: int) -> torch.Tensor:
    """[T, B] per-thread accumulators: thread t folds step(acc, x[:, i]) over i = t, t + B, ... from +0; threads past
    the end of a column skip the step (a masked update, so nothing is added for them, not even a zero)."""
    t, h = x.shape
    acc = torch.zeros(t, b, dtype=x.dtype, device=x.device)
    for c0 in range(0, h, b):
        n = min(b, h - c0)
        col = torch.nn.functional.pad(x[:, c0:c0 + n], (0, b - n))
        new = step(acc, col)
        acc = new if n == b else torch.cat([new[:, :n], acc[:, n:]], dim=1)
    return acc


def layernorm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 y [T, H] of generalLayerNorm (steps a-c): x and weight are rounded to fp16 first (the engine's inputs
    are fp16); mean and variance in the kernel's thread and lane order."""
    x16 = x.to(torch.float16).to(torch.float32)
    g16 = weight.to(torch.float16).to(torch.float32)
    t, h = x16.shape
    b = norm_threads(h)
    inv_h = rcp(torch.tensor(float(h), device=x.device))
    mean = (block_sum(_per_thread(x16, lambda acc, v: v + acc, b)) * inv_h).unsqueeze(1)   # FMUL(S, RCP(H))
    d = x16 - mean                                                                          # FADD(x, -mean)
    var = block_sum(_per_thread(d, lambda acc, v: fma_f32(v, v, acc), b))                   # FFMA(d, d, acc)
    eps32 = torch.full_like(var, eps)                                                       # the float argument
    rs = rsqrt(fma_f32(var, inv_h.expand_as(var), eps32)).unsqueeze(1)
    return (d * rs) * g16                                                                   # FMUL, FMUL


def quantize_normed(y: torch.Tensor, with_sum: bool = True) -> Int8Tokens:
    """Steps c-e on float32 y [T, H]: the codes from y, amax and the per-token sum from fp16(y) (the sum in fp16 per
    thread, then float32 across threads); without with_sum (rms_norm_general) the sum is None."""
    t, h = y.shape
    h16 = y.to(torch.float16).to(torch.float32)
    amax = h16.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_START)   # max is exact: order-free
    r = rcp(amax) * 127.0                                              # FMUL(RCP(A), 127)
    prod = r * y
    codes = torch.nan_to_num(torch.round(prod), nan=0.0).clamp(-128, 127)   # cvt.rni.sat.s8, NaN -> 0
    scale = (amax * INV127).to(torch.float16)                          # F2FP(FMUL(A, fp32(1/127)))
    total = None
    if with_sum:
        def hadd(acc, v):   # fp16 + fp16 is exact in float64 (<= 40 significant bits): one rounding to fp16
            return round_once(acc.to(torch.float64) + v.to(torch.float64), torch.float16).to(torch.float32)
        total = block_sum(_per_thread(h16, hadd, norm_threads(h))).reshape(t, 1).to(torch.float16)
    return Int8Tokens(codes, scale, total)


def rms_norm_general(x: torch.Tensor, weight: torch.Tensor, eps: float, with_sum: bool = True) -> NormQuant:
    """QServe's fused norm + quantization on the block input x [T, H] (fp16 values) with the norm weight [H]:
    rms_norm_general_fuse_sum (with_sum) or rms_norm_general."""
    y = layernorm_f32(x, weight, eps)
    a = quantize_normed(y, with_sum)
    return NormQuant(a.codes, a.scale, a.sum, y, y.to(torch.float16).to(torch.float32))


def silu16(g: torch.Tensor) -> torch.Tensor:
    """fp16 values (in float32) of silu() in silu_and_mul_kernel: F2FP(FMUL(g, RCP(FADD(EX2(FMUL(-g, log2e)), 1))))."""
    g = g.to(torch.float16).to(torch.float32)
    e = ex2(-g * LOG2E)
    return (g * rcp(e + 1.0)).to(torch.float16).to(torch.float32)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp16 values (in float32) that silu_and_mul_kernel writes: F2FP(silu16(gate) * up), the product exact."""
    return (silu16(gate) * up.to(torch.float16).to(torch.float32)).to(torch.float16).to(torch.float32)
