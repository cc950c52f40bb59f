"""QServe's run-time numerics on the CPU, instruction for instruction (mit-han-lab/qserve de6a2ec, kernels built as
its setup.py does, with --use_fast_math; the order below was read from the sm_90 SASS that nvcc 13.0 makes of them):

GEMM epilogue (kernels/csrc/qgemm/*/gemm_cuda.cu, w8a8/w8a8_gemm_cuda.cu), psum the exact int32 of the integer GEMM:
  pf = I2F.RN(psum)                                        (float32; rounds once |psum| > 2^24)
  per channel  `psum * wscale * ascale - w_sz * a_ssum`:   t1 = FMUL(wscale, pf); t2 = FMUL(w_sz, a_ssum);
                                                           out = FFMA(ascale, t1, -t2)   (ptxas contracts mul + sub)
  g128 / W8A8  `psum *= wscale * ascale`:                  out = FMUL(pf, FMUL(wscale, ascale))
  then F2FP (float32 -> fp16, round to nearest even). FTZ on every op changes nothing after the fp16 rounding (no
  operand is a float32 subnormal; a subnormal result is an fp16 zero of the same sign either way).
Activation quantization (kernels/csrc/fused_kernels.cu quant_kernel[_fuse_sum], one CTA of min(K, 1024) threads per
token): amax and the sum in float32; scale = F2FP(FMUL(amax, fp32(1/127))) (the division by 127 is folded to a
multiply); codes = cvt.rni.sat.s8(FMUL(x, FMUL(MUFU.RCP(amax), 127))); the sum: thread t adds x[t], x[t + B], ...
in order, then a butterfly over each warp's 32 lanes, then the same over the warps' sums, rounded to fp16.
MUFU.RCP (rcp.approx.ftz.f32, <= 1 ulp) is not specified bit for bit; the correctly rounded 1/amax stands in for it
here (dcc.ir.actquant; GPU: csrc/w4a8/quant_act.cu takes the same correctly rounded reciprocal, __frcp_rn). This
kernel quantizes the inputs of o_proj and down_proj; those of qkv_proj and gate_up_proj come from the fused norm
kernel (numerics_fused.py)."""
from __future__ import annotations

import torch

from ...ir.actquant import Int8Tokens, quantize_tokens_int8
from ..common.rounding import fma_f32

QUANT_THREADS = 1024   # quant_kernel_fuse_sum's block: min(hidden_size, 1024) threads, one token per CTA
WARP = 32


def int_to_f32(psum: torch.Tensor) -> torch.Tensor:
    """I2F.F32.S32 (round to nearest even) of exact integer values held in any float or int tensor."""
    return psum.to(torch.float64).to(torch.float32)   # float64 holds |psum| < 2^53 exactly: one rounding


def epilogue_per_channel(psum: torch.Tensor, s1: torch.Tensor, szeros: torch.Tensor, ascale: torch.Tensor,
                         asum: torch.Tensor) -> torch.Tensor:
    """fp16 [T, N] = F2FP(FFMA(ascale, FMUL(s1, float(psum)), -FMUL(szeros, asum))). psum [T, N] exact integers;
    s1, szeros fp16 values [1, N]; ascale, asum fp16 values [T, 1]."""
    pf = int_to_f32(psum)
    t1 = s1.to(torch.float32) * pf                        # FMUL: one float32 rounding (torch CPU is IEEE)
    t2 = szeros.to(torch.float32) * asum.to(torch.float32)   # exact (11 x 11 significant bits), as on the GPU
    return fma_f32(ascale.to(torch.float32).expand_as(t1), t1, -t2.expand_as(t1)).to(torch.float16)


def epilogue_scaled(psum: torch.Tensor, s1: torch.Tensor, ascale: torch.Tensor) -> torch.Tensor:
    """fp16 [T, N] = F2FP(FMUL(float(psum), FMUL(s1, ascale))): QServe's g128 and W8A8 epilogue. s1 * ascale is
    exact in float32; the product with psum rounds to float32, then to fp16 (two roundings, as the engine)."""
    return (int_to_f32(psum) * (s1.to(torch.float32) * ascale.to(torch.float32))).to(torch.float16)


def token_sum(x16: torch.Tensor, threads: int = QUANT_THREADS) -> torch.Tensor:
    """fp16 [T, 1] per-token sums of fp16 values (held in float32) [T, K] in quant_kernel_fuse_sum's order: B =
    min(K, threads) threads, thread t adds x[t], x[t+B], ... to 0 in float32, each warp butterflies its 32 partial
    sums (lane l adds lane l ^ 16, ^ 8, ^ 4, ^ 2, ^ 1: every lane gets the same bits, since IEEE addition is
    commutative), then the first warp does the same over the warp sums (lanes past B/32 read 0). K % 32 == 0 (the
    W4A8 layout's rule) makes every warp full; other K are emulated with zero lanes (the engine's shuffles over a
    partial warp read undefined lanes)."""
    t, k = x16.shape
    b = min(k, threads)
    cols = -(-k // b)
    x = torch.nn.functional.pad(x16.to(torch.float32), (0, cols * b - k)).reshape(t, cols, b)
    part = torch.zeros_like(x[:, 0])
    for c in range(cols):   # +0 + x is x, and a padded +0 never turns a +0 sum into -0: the padding is inert
        part = part + x[:, c]
    return block_sum(part).reshape(t, 1).to(torch.float16)


def block_sum(part: torch.Tensor) -> torch.Tensor:
    """float32 [T] from the per-thread partial sums [T, B] (B <= 1024) of blockReduceSum / blockAllReduceSum
    (kernels/csrc/reduction_utils.cuh), as its thread 0 gets it: each warp butterflies its 32 lanes (lanes past B
    read 0), then the first warp butterflies the warp sums (lanes past the warp count read 0)."""
    t, b = part.shape
    warps = -(-b // WARP)
    v = _butterfly(torch.nn.functional.pad(part, (0, warps * WARP - b)).reshape(t, warps, WARP))   # [T, warps]
    return _butterfly(torch.nn.functional.pad(v, (0, WARP - warps)))


def _butterfly(v: torch.Tensor) -> torch.Tensor:
    """[..., 32] -> [...]: warpReduceSum's xor butterfly (masks 16, 8, 4, 2, 1) in float32."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def quantize_tokens(x: torch.Tensor) -> Int8Tokens:
    """QServe's invoke_quant_fuse_sum on [T, K] (rounded to fp16 first, as the engine's input is): codes and scale
    as dcc.ir.actquant computes them (the same float32 operations: scale = fp16(amax / 127) equals the engine's
    fp16(amax * fp32(1/127)) for every fp16 amax, since amax / 127 never falls within float32 rounding of an fp16
    tie; the reciprocal is the correctly rounded one, see the module docstring), the sum in the engine's order."""
    a = quantize_tokens_int8(x)
    return Int8Tokens(a.codes, a.scale, token_sum(x.to(torch.float16).to(torch.float32)))
