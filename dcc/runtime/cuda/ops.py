"""Torch-facing W4A16 ops on the GPU for TinyChat-layout tensors (qweight int16 [N/4, K], scales and scaled_zeros
[Kg, N]); they pass data_ptr()s and the current stream to the extension, which never links libtorch."""
from __future__ import annotations

import os

import torch

from .build import load

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _scale_rows(num_groups: int, group_size: int) -> int:
    """Rows of scales / scaled_zeros the kernels index: the group count rounded up to a multiple of 8 * (128 / G)
    for G <= 128 (the W4A16 layout's padding; its packer computes the same number, and a test checks they agree)."""
    unit = 8 * max(1, 128 // group_size)
    return -(-num_groups // unit) * unit

# M <= FUSED_MAX_M: the fused dequant + mma.sync kernel (weights read once per 64 rows of x); larger M: dequantise
# into a scratch [N, K] buffer and run one cuBLAS GEMM. Set from bench/gpu_w4a16.py on an H100 (csrc/w4a16/DESIGN.md):
# at M = 64 the fused kernel wins on 14336x4096 and 4096x14336 and is within 10% on 4096x4096; at 256 the GEMM wins.
FUSED_MAX_M = int(os.environ.get("DCC_W4A16_FUSED_MAX_M", "64"))


def _wgmma_range(spec: str) -> tuple[int, int]:
    """DCC_W4A16_WGMMA: "LO:HI" sends LO < M <= HI to the Hopper wgmma GEMM where it runs (sm_90a build on an sm_90
    GPU, N % 128 == 0); "off" sends no M there. Default 32:256, from bench/gpu_w4a16.py on an H100
    (csrc/w4a16/DESIGN.md): from M = 64 to 256 it beats the fused kernel and dequantise + cuBLAS on every Llama-3-8B
    shape; at M <= 32 the fused kernel wins two of the three shapes, at M = 1024 dequantise + cuBLAS all three."""
    if spec in ("", "off", "0"):
        return (0, 0)
    try:
        lo, hi = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"DCC_W4A16_WGMMA must be 'off' or 'LO:HI' (M range), got {spec!r}") from None
    return (lo, hi)


WGMMA_M = _wgmma_range(os.environ.get("DCC_W4A16_WGMMA", "32:256"))
# Below that range, 16 < M <= WGMMA_M[0], the wgmma GEMM also takes the layers wide enough that their 128-channel
# tiles alone fill half the SMs. H100, M = 32, two runs of bench/gpu_w4a16.py (csrc/w4a16/DESIGN.md): 14336 x 4096
# (112 tiles) took 29.3 / 31.9 us on wgmma against 51.2 / 71.4 fused (cuBLAS fp16: 45.9); at N = 4096 (32 tiles) the
# runs disagreed (4096^2: fused 14.4 / 21.0 us, wgmma 18.1 / 19.5), so those stay on the fused kernel.
WIDE_WGMMA_MIN_M = 16


def choose_path(m: int, n: int, sms: int, wgmma_runs: bool) -> str:
    """The kernel path="auto" takes for M rows and N output channels on a GPU of `sms` SMs; wgmma_runs: whether the
    wgmma GEMM runs there (gemm_wgmma_supported)."""
    if wgmma_runs and (WGMMA_M[0] < m <= WGMMA_M[1]
                       or (WIDE_WGMMA_MIN_M < m <= WGMMA_M[0] and 2 * (n // 128) >= sms)):
        return "wgmma"
    return "fused" if m <= FUSED_MAX_M else "gemm"


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_layout(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
                  device: torch.device | None = None) -> tuple[int, int]:
    if qweight.dtype != torch.int16 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int16 [N/4, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = 4 * qweight.shape[0], qweight.shape[1]
    if group_size not in (32, 64, 128) or k % group_size or k % 64 or n == 0:
        raise ValueError(f"qweight [{n // 4}, {k}] with group size {group_size}: K must be a positive multiple of 64 "
                         f"and of the group size (32, 64 or 128)")
    kg = _scale_rows(k // group_size, group_size)
    for name, t in (("scales", scales), ("scaled_zeros", scaled_zeros)):
        if tuple(t.shape) != (kg, n):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{kg}, {n}]")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if scales.dtype != scaled_zeros.dtype:
        raise ValueError(f"scales ({scales.dtype}) and scaled_zeros ({scaled_zeros.dtype}) differ in dtype")
    dev = device if device is not None else qweight.device
    for name, t in (("qweight", qweight), ("scales", scales), ("scaled_zeros", scaled_zeros)):
        if not t.is_cuda or t.device != dev:
            raise ValueError(f"{name} must be a CUDA tensor on {dev}, got {t.device}")
    return n, k


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (a view at an odd offset is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None, *, path: str = "auto",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] fp16/bf16 on the GPU, W the decoded TinyChat weight (decode_weight);
    fp32 accumulation, output in x's dtype. path: "auto", "fused" (dequant in registers + mma.sync), "wgmma" (Hopper:
    dequant in registers + wgmma, activations by TMA; N % 128 == 0), "gemm" (dequantise to a scratch buffer +
    PyTorch's cuBLAS matmul) or "gemm_ext" (the same through the extension's own cublasGemmEx call). out: an optional
    contiguous [..., N] tensor to write into."""
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    n, k = _check_layout(qweight, scales, scaled_zeros, group_size, x.device)
    if scales.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the scales are {scales.dtype}: cast x (the kernels take one dtype)")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = _dense(x.reshape(-1, k))
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif (tuple(out.shape) not in ((m, n), (*lead, n)) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)} on {x.device}")
    b = 0
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{n}]")
        bias = _dense(bias.to(device=x.device, dtype=x.dtype))
        b = bias.data_ptr()
    if m == 0:
        return out.reshape(*lead, n)
    qweight, scales, scaled_zeros = _dense(qweight), _dense(scales), _dense(scaled_zeros)
    ext = load()
    dt = _DTYPES[x.dtype]
    if path == "auto":
        path = choose_path(m, n, _sms(x.device), ext.gemm_wgmma_supported(m, n, k, group_size))
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if path == "fused":
            ext.gemv(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), scaled_zeros.data_ptr(), b, out.data_ptr(),
                     m, n, k, group_size, dt, 0, stream)
        elif path == "wgmma":
            ext.gemm_wgmma(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), scaled_zeros.data_ptr(), b,
                           out.data_ptr(), m, n, k, group_size, dt, stream)
        elif path in ("gemm", "gemm_ext"):
            w = torch.empty(n, k, dtype=x.dtype, device=x.device)  # stream-ordered reuse by the caching allocator
            if path == "gemm_ext":  # the extension's own cuBLAS call (what a non-torch caller gets)
                ext.gemm(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), scaled_zeros.data_ptr(), b,
                         out.data_ptr(), w.data_ptr(), m, n, k, group_size, dt, stream)
            else:  # PyTorch's cuBLAS/cuBLASLt choice, bias fused in the epilogue: a few % faster (csrc/w4a16/DESIGN.md)
                ext.dequantize(qweight.data_ptr(), scales.data_ptr(), scaled_zeros.data_ptr(), w.data_ptr(), n, k,
                               group_size, dt, stream)
                o2 = out.view(m, n)
                if bias is None:
                    torch.mm(x2, w.t(), out=o2)
                else:
                    torch.addmm(bias, x2, w.t(), out=o2)
        else:
            raise ValueError(f"path must be auto, fused, wgmma, gemm or gemm_ext, got {path!r}")
    return out.reshape(*lead, n)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
               in_features: int) -> torch.Tensor:
    """The [N, K] weight on the GPU, bit-identical to the W4A16 layout's CPU decode (decode_weight)."""
    n, k = _check_layout(qweight, scales, scaled_zeros, group_size)
    if k != in_features:
        raise ValueError(f"qweight has K = {k}, expected in_features = {in_features}")
    qweight = _dense(qweight)
    scales, scaled_zeros = scales.contiguous(), scaled_zeros.contiguous()
    w = torch.empty(n, k, dtype=scales.dtype, device=qweight.device)
    ext = load()
    with torch.cuda.device(qweight.device):
        ext.dequantize(qweight.data_ptr(), scales.data_ptr(), scaled_zeros.data_ptr(), w.data_ptr(), n, k, group_size,
                       _DTYPES[scales.dtype], torch.cuda.current_stream(qweight.device).cuda_stream)
    return w


def w4a16_glu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """SiLU(gate) * up for x [..., K] (at most 8 rows) and a gate_up weight whose rows interleave gate and up in
    blocks of 8 (dcc/targets/tinychat/fastlm.interleave_gate_up): one GEMV with SwiGLU in its epilogue, [..., N / 2]
    in x's dtype, bit for bit w4a16_linear followed by silu_mul on the same rows."""
    if not x.is_cuda or x.dtype not in _DTYPES or scales.dtype != x.dtype:
        raise ValueError(f"x must be a CUDA float16/bfloat16 tensor of the scales' dtype {scales.dtype}, got "
                         f"{x.dtype} on {x.device}")
    n, k = _check_layout(qweight, scales, scaled_zeros, group_size, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    x2 = _dense(x.reshape(-1, k))
    m = x2.shape[0]
    ext = load()
    if not ext.gemv_glu_fits(m, n, k):
        raise ValueError(f"the gate_up GEMV takes M <= 8, K % 128 == 0 and N % 16 == 0, got M = {m}, N = {n}, K = {k}")
    out = torch.empty(m, n // 2, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        ext.gemv_glu(x2.data_ptr(), _dense(qweight).data_ptr(), _dense(scales).data_ptr(),
                     _dense(scaled_zeros).data_ptr(), out.data_ptr(), m, n, k, group_size, _DTYPES[x.dtype],
                     torch.cuda.current_stream(x.device).cuda_stream)
    return out.reshape(*x.shape[:-1], n // 2)


def w4a16_linear_add_rmsnorm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             scaled_zeros: torch.Tensor, group_size: int, h: torch.Tensor, weight: torch.Tensor,
                             eps: float, counter: torch.Tensor) -> torch.Tensor | None:
    """The decoder's residual add + RMSNorm after a W4A16 linear, in the linear's launch (csrc/w4a16/gemv_norm.cu):
    h [M, N] float32 += x W^T (rounded to x's dtype, as w4a16_linear), returns RMSNorm(h) * weight in x's dtype,
    bit for bit w4a16_linear then dcc.runtime.fastlm.ops.add_rmsnorm. counter: an int32 CUDA tensor of one element,
    zero (each call leaves it zero). None where the kernel does not take the shape (M > 8, a row wider than 8192, more
    row tiles than resident blocks) or the tensors: the caller runs the two ops."""
    if not x.is_cuda or x.dtype not in _DTYPES or scales.dtype != x.dtype or weight.dtype != x.dtype:
        return None
    n, k = _check_layout(qweight, scales, scaled_zeros, group_size, x.device)
    x2 = _dense(x.reshape(-1, k))
    m = x2.shape[0]
    if (h.dtype != torch.float32 or tuple(h.shape) != (m, n) or not h.is_contiguous() or h.data_ptr() % 16
            or weight.numel() != n or counter.dtype != torch.int32 or counter.device != x.device
            or not load().gemv_add_rmsnorm_fits(m, n, k, _DTYPES[x.dtype])):
        return None
    delta = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        load().gemv_add_rmsnorm(x2.data_ptr(), _dense(qweight).data_ptr(), _dense(scales).data_ptr(),
                                _dense(scaled_zeros).data_ptr(), delta.data_ptr(), m, n, k, group_size, h.data_ptr(),
                                _dense(weight).data_ptr(), out.data_ptr(), float(eps), counter.data_ptr(),
                                _DTYPES[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
    return out
