"""Torch-facing W4A8 ops on the GPU for QServe-layout tensors (research/targets.md 1A): per-token int8 activation
quantization and the W4A8 GEMM (mma.sync kernels, or Hopper wgmma where built and the shape suits it). They pass
data_ptr()s and the current stream to csrc/w4a8 (module dcc_w4a8_ext), which never links libtorch."""
from __future__ import annotations

import torch

from .build import load

# Automatic choice: gemm_wgmma where the extension prefers it (gemm_wgmma_preferred: an sm_90a build, N % 256 == 0,
# K % 128 == 0, and at M <= 16 where the cluster GEMV is built a layer of more than 16 MB at M >= 8; the dispatch
# table and its measurements are in csrc/w4a8/DESIGN.md), else the mma.sync kernels (at M <= 16 on sm_90+: the
# cluster GEMV).

_WORKSPACE: dict[tuple, torch.Tensor] = {}


def ext():
    return load(name="w4a8")


def _workspace(kind: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """A zero-initialised scratch buffer per (kind, device), grown on demand. The split-K kernels need their arrival
    counters zero on entry and reset them on exit, so the buffer is zeroed only when it is (re)allocated. One per
    device: calls on several streams of one device at once would share it (the runtime issues one stream)."""
    key = (kind, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = torch.zeros(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
        _WORKSPACE[key] = buf
    return buf


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (a view at an odd offset is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def quantize_act(x: torch.Tensor, with_sum: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp16 x [M, K] on the GPU -> (int8 codes [M, K], fp16 scale [M], fp16 sum [M] or None), bit-identical to
    dcc.ir.actquant.quantize_tokens_int8 for codes and scale; the sum is fp16 of the exact sum."""
    if not x.is_cuda or x.dtype != torch.float16 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float16 CUDA tensor, got {x.dtype} {tuple(x.shape)} on {x.device}")
    x = _dense(x)
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float16, device=x.device)
    ssum = torch.empty(m, dtype=torch.float16, device=x.device) if with_sum else None
    if m and k:
        with torch.cuda.device(x.device):
            ext().quant_act(x.data_ptr(), xq.data_ptr(), scale.data_ptr(), 0 if ssum is None else ssum.data_ptr(),
                            m, k, _stream(x.device))
    return xq, scale, ssum


def _check(qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group, device) -> tuple[int, int]:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if n % 32 or k % 32 or n == 0:
        raise ValueError(f"qweight [{n}, {k // 2}]: N and K must be positive multiples of 32 (32x32 tiles)")
    if s1_scales.dtype != torch.float16 or s1_scales.numel() != n:
        raise ValueError(f"s1_scales must be float16 [{n}], got {s1_scales.dtype} {tuple(s1_scales.shape)}")
    if group == 0:
        if s1_szeros is None or s1_szeros.dtype != torch.float16 or s1_szeros.numel() != n:
            raise ValueError(f"per-channel (group 0) needs s1_szeros float16 [{n}]")
        if s2_scales is not None or s2_zeros is not None:
            raise ValueError("per-channel (group 0) takes no s2_scales / s2_zeros")
    elif group in (64, 128):
        if k % group:
            raise ValueError(f"K = {k} is not a multiple of the group size {group}")
        for name, t in (("s2_scales", s2_scales), ("s2_zeros", s2_zeros)):
            if t is None or t.dtype != torch.int8 or tuple(t.shape) != (k // group, n):
                raise ValueError(f"group {group} needs {name} int8 [{k // group}, {n}], got "
                                 f"{None if t is None else (t.dtype, tuple(t.shape))}")
        if s1_szeros is not None:
            raise ValueError(f"group {group} takes no s1_szeros")
    else:
        raise ValueError(f"group must be 0 (per channel), 64 or 128, got {group}")
    for name, t in (("qweight", qweight), ("s1_scales", s1_scales), ("s1_szeros", s1_szeros),
                    ("s2_scales", s2_scales), ("s2_zeros", s2_zeros)):
        if t is not None and (not t.is_cuda or t.device != device):
            raise ValueError(f"{name} must be a CUDA tensor on {device}, got {t.device}")
    return n, k


def gemm(xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group: int, *, path: str = "auto",
         out: torch.Tensor | None = None) -> torch.Tensor:
    """out fp16 [M, N] from already-quantized activations (int8 [M, K], fp16 scale/sum [M]). path: auto, mma
    (the mma.sync kernels, chosen by M: the cluster GEMV at M <= 16 on sm_90+), gemv (M <= 16, sm_90+), splitk
    (M <= 32), tile, or wgmma (raises where it is not built or the shape is not supported); an int is passed on as
    gemm_mma_kernel's kernel code (forced block shapes and split counts, for tests and benchmarks)."""
    m, k = xq.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float16, device=xq.device)
    e = ext()
    if path == "auto":
        path = "wgmma" if e.gemm_wgmma_preferred(m, n, k, group) else "mma"
    codes = {"mma": 0, "splitk": 1, "tile": 2, "gemv": 4}
    kernel = path if isinstance(path, int) else codes.get(path)   # an int: a raw kernel code
    if kernel is None and path != "wgmma":
        raise ValueError(f"path must be auto, mma, gemv, splitk, tile or wgmma, got {path!r}")
    if m == 0:
        return out
    ws_bytes = e.gemm_wgmma_workspace(m, n, k, group) if kernel is None else \
        e.gemm_mma_kernel_workspace(kernel, m, n, k, group)
    ws = _workspace("wgmma" if kernel is None else "mma", ws_bytes, xq.device) if ws_bytes else None
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = (xq.data_ptr(), ascale.data_ptr(), ptr(asum), qweight.data_ptr(), s1_scales.data_ptr(), ptr(s1_szeros),
            ptr(s2_scales), ptr(s2_zeros), out.data_ptr(), m, n, k, group, ptr(ws), ws_bytes, _stream(xq.device))
    with torch.cuda.device(xq.device):
        if kernel is None:
            e.gemm_wgmma(*args)
        else:
            e.gemm_mma_kernel(kernel, *args)
    return out


def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, s1_scales: torch.Tensor, s1_szeros: torch.Tensor | None,
                s2_scales: torch.Tensor | None, s2_zeros: torch.Tensor | None, group: int, *, path: str = "auto",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] fp16 = what QServe's W4A8 GEMM computes for x [..., K] (cast to fp16): int8 per-token
    activations, integer GEMM against the stored codes, epilogue rounded once to fp16 (research/targets.md 1A).
    group 0: per channel (s1_szeros); 64 / 128: progressive groups (s2_scales, s2_zeros)."""
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    n, k = _check(qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.float16)
    xq, ascale, asum = quantize_act(x2, with_sum=group == 0)
    qweight, s1_scales = _dense(qweight), _dense(s1_scales)
    s1_szeros, s2_scales, s2_zeros = (None if t is None else _dense(t) for t in (s1_szeros, s2_scales, s2_zeros))
    if out is not None and (out.dtype != torch.float16 or not out.is_contiguous() or out.numel() != xq.shape[0] * n):
        raise ValueError(f"out must be a contiguous float16 tensor of {xq.shape[0] * n} elements")
    y = gemm(xq, ascale, asum, qweight, s1_scales, s1_szeros, s2_scales, s2_zeros, group, path=path,
             out=None if out is None else out.view(-1, n))
    return y.reshape(*lead, n)
