"""Torch-facing W4A4 ops on the GPU (Nunchaku INT4 and NVFP4, research/targets.md 3A): the activation kernel (smooth
division, per-group 4-bit codes and scales, the low-rank down-projection of the raw input) and the GEMM (exact int32
per group, fp32 group accumulation, bias and low-rank up-projection, one rounding to 16 bits). They pass data_ptr()s
and the current stream to csrc/w4a4 (module dcc_w4a4_ext), which never links libtorch.

Device layout the kernels read (unpacked once, at load: csrc/w4a4/DESIGN.md), row-major: INT4 weight codes int8
[N, K] (one code a byte) and wscales [N, K/64] in the layer's 16-bit dtype; NVFP4 weight codes uint8 [N, K] (e2m1 bit
patterns) and wscales uint8 [N, K/16] (e4m3 bytes; a float8_e4m3fn tensor is viewed as bytes), alpha a float and
wcscales [N] 16-bit; smooth [K], lora_down transposed [K, R], lora_up [N, R], bias [N] in the 16-bit dtype."""
from __future__ import annotations

import torch

from .build import load

GROUP = 64
SHIFT_GELU = 0.171875   # Nunchaku's shift of an after-GELU (unsigned) layer's input, exact in fp16 and bf16
DTYPES = {torch.float16: 0, torch.bfloat16: 1}


def ext():
    return load(name="w4a4")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (a view at an odd offset is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _need(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    if t is None:
        raise ValueError(f"{name} is required")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}, got {t.dtype} {tuple(t.shape)} on "
                         f"{t.device}")


def _epilogue_operands(lora_act, lora_up, out, m: int, n: int, dtype, dev):
    """The GEMMs' epilogue operands checked: (rank of the low-rank branch, the output buffer, made if None)."""
    if (lora_act is None) != (lora_up is None):
        raise ValueError("lora_act and lora_up go together")
    rank = 0 if lora_up is None else lora_up.shape[1]
    if rank:
        _need("lora_act", lora_act, torch.float32, (m, rank), dev)
        _need("lora_up", lora_up, dtype, (n, rank), dev)
    if out is None:
        out = torch.empty(m, n, dtype=dtype, device=dev)
    elif out.dtype != dtype or not out.is_contiguous() or tuple(out.shape) != (m, n) or out.device != dev:
        raise ValueError(f"out must be a contiguous {dtype} [{m}, {n}] tensor on {dev}")
    return rank, out


def _act_inputs(x, smooth, lora_down_t):
    """The activation kernels' checked, dense inputs: (x, smooth, lora_down_t, M, K, rank)."""
    if not x.is_cuda or x.dtype not in DTYPES or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float16/bfloat16 CUDA tensor, got {x.dtype} {tuple(x.shape)} on "
                         f"{x.device}")
    m, k = x.shape
    if k % GROUP:
        raise ValueError(f"x has {k} features: the W4A4 kernels take multiples of {GROUP}")
    if smooth is not None:
        _need("smooth", smooth, x.dtype, (k,), x.device)
        smooth = _dense(smooth)
    rank = 0
    if lora_down_t is not None and lora_down_t.shape[-1] > 0:
        rank = lora_down_t.shape[1]
        _need("lora_down_t", lora_down_t, x.dtype, (k, rank), x.device)
        if rank % 16:
            raise ValueError(f"the low-rank branch's rank {rank} must be a multiple of 16")
        lora_down_t = _dense(lora_down_t)
    x = _dense(x)
    return x, smooth, lora_down_t, m, k, rank


def quantize(x: torch.Tensor, smooth: torch.Tensor | None = None, lora_down_t: torch.Tensor | None = None, *,
             unsigned: bool = False, shift: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] fp16/bf16 on the GPU -> (codes int8 [M, K], ascales [M, K/64] in x's dtype, lora_act fp32 [M, R] or
    None), codes and scales bit-identical to dcc.ir.w4a4.quantize_act_int4(x, smooth, 64, unsigned, x.dtype, shift).
    smooth [K] (x's dtype) or None; lora_down_t [K, R] (x's dtype, R a multiple of 16) or None: the low-rank
    down-projection of the raw x. shift: default SHIFT_GELU when unsigned, else 0."""
    x, smooth, lora_down_t, m, k, rank = _act_inputs(x, smooth, lora_down_t)
    shift = (SHIFT_GELU if unsigned else 0.0) if shift is None else float(shift)
    if shift and float(torch.tensor(shift, dtype=x.dtype)) != shift:
        raise ValueError(f"shift {shift} is not exactly representable in {x.dtype}")
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    ascales = torch.empty(m, k // GROUP, dtype=x.dtype, device=x.device)
    lora_act = torch.empty(m, rank, dtype=torch.float32, device=x.device) if rank else None
    if m == 0:
        return codes, ascales, lora_act
    e = ext()
    ws_bytes = e.quant_act_workspace(m, k, rank)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device) if ws_bytes else None
    with torch.cuda.device(x.device):
        e.quant_act(x.data_ptr(), _ptr(smooth), _ptr(lora_down_t if rank else None), codes.data_ptr(),
                    ascales.data_ptr(), _ptr(lora_act), _ptr(ws), ws_bytes, m, k, rank, DTYPES[x.dtype],
                    int(unsigned), shift, _stream(x.device))
    return codes, ascales, lora_act


def gemm(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
         bias: torch.Tensor | None = None, lora_act: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
         *, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] in ascales' dtype: acodes int8 [M, K] and ascales [M, K/64] (quantize's), wcodes int8 [N, K],
    wscales [N, K/64], bias [N] or None, lora_act fp32 [M, R] with lora_up [N, R] or both None."""
    if acodes.dtype != torch.int8 or acodes.dim() != 2 or not acodes.is_cuda:
        raise ValueError(f"acodes must be int8 [M, K] on a GPU, got {acodes.dtype} {tuple(acodes.shape)}")
    dev, dtype = acodes.device, ascales.dtype
    if dtype not in DTYPES:
        raise ValueError(f"ascales must be float16 or bfloat16, got {dtype}")
    m, k = acodes.shape
    n = wcodes.shape[0]
    if k % GROUP:
        raise ValueError(f"K = {k}: the W4A4 kernels take multiples of {GROUP}")
    _need("ascales", ascales, dtype, (m, k // GROUP), dev)
    _need("wcodes", wcodes, torch.int8, (n, k), dev)
    _need("wscales", wscales, dtype, (n, k // GROUP), dev)
    if bias is not None:
        _need("bias", bias, dtype, (n,), dev)
    rank, out = _epilogue_operands(lora_act, lora_up, out, m, n, dtype, dev)
    if m == 0:
        return out
    t = [_dense(v) if v is not None else None for v in (acodes, ascales, wcodes, wscales, bias, lora_act, lora_up)]
    with torch.cuda.device(dev):
        ext().gemm(*(_ptr(v) for v in t), out.data_ptr(), m, n, k, rank, DTYPES[dtype], _stream(dev))
    return out


def w4a4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor | None = None,
                lora_down_t: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, unsigned: bool = False) -> torch.Tensor:
    """y [..., N] in wscales' dtype for x [..., K] (cast to that dtype): quantize, then gemm. The weights as the
    device layout above (wcodes int8 [N, K], wscales [N, K/64], smooth [K], lora_down_t [K, R], lora_up [N, R],
    bias [N]). Bit-identical to dcc.targets.nunchaku.cuda_numerics.w4a4_int4_linear_cuda."""
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    k = wcodes.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(wscales.dtype)
    codes, ascales, lora_act = quantize(x2, smooth, lora_down_t, unsigned=unsigned)
    y = gemm(codes, ascales, wcodes, wscales, bias, lora_act, lora_up if lora_act is not None else None)
    return y.reshape(*lead, wcodes.shape[0])


# ----------------------------------------------------------------------------------------------------- NVFP4

def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def quantize_nvfp4(x: torch.Tensor, smooth: torch.Tensor | None = None, lora_down_t: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] fp16/bf16 on the GPU -> (codes uint8 [M, K] e2m1 bit patterns, micro-scales float8_e4m3fn [M, K/16],
    lora_act fp32 [M, R] or None), codes and scales bit-identical to dcc.ir.w4a4.quantize_act_nvfp4(x, smooth, 16,
    x.dtype). K % 64 == 0 (the kernel walks 64-k chunks)."""
    x, smooth, lora_down_t, m, k, rank = _act_inputs(x, smooth, lora_down_t)
    codes = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m, k // 16, dtype=torch.uint8, device=x.device)
    lora_act = torch.empty(m, rank, dtype=torch.float32, device=x.device) if rank else None
    if m:
        e = ext()
        ws_bytes = e.quant_act_workspace(m, k, rank)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device) if ws_bytes else None
        with torch.cuda.device(x.device):
            e.quant_act_nvfp4(x.data_ptr(), _ptr(smooth), _ptr(lora_down_t if rank else None), codes.data_ptr(),
                              scales.data_ptr(), _ptr(lora_act), _ptr(ws), ws_bytes, m, k, rank, DTYPES[x.dtype],
                              _stream(x.device))
    return codes, scales.view(torch.float8_e4m3fn), lora_act


def gemm_nvfp4(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
               alpha: float, dtype: torch.dtype, wcscales: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, lora_act: torch.Tensor | None = None,
               lora_up: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] in dtype: acodes uint8 [M, K] e2m1 patterns and ascales e4m3 [M, K/16] (quantize_nvfp4's),
    wcodes uint8 [N, K], wscales e4m3 [N, K/16] (float8_e4m3fn or their bytes), alpha the per-tensor weight scale,
    wcscales [N] (dtype) or None, bias [N] or None, lora_act fp32 [M, R] with lora_up [N, R] or both None."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    dev = acodes.device
    if not acodes.is_cuda or acodes.dim() != 2:
        raise ValueError(f"acodes must be uint8 [M, K] on a GPU, got {acodes.dtype} {tuple(acodes.shape)}")
    m, k = acodes.shape
    n = wcodes.shape[0]
    if k % GROUP:
        raise ValueError(f"K = {k}: the W4A4 kernels take multiples of {GROUP}")
    ascales, wscales = _bytes(ascales), _bytes(wscales)
    _need("acodes", acodes, torch.uint8, (m, k), dev)
    _need("ascales", ascales, torch.uint8, (m, k // 16), dev)
    _need("wcodes", wcodes, torch.uint8, (n, k), dev)
    _need("wscales", wscales, torch.uint8, (n, k // 16), dev)
    for name, t in (("wcscales", wcscales), ("bias", bias)):
        if t is not None:
            _need(name, t, dtype, (n,), dev)
    rank, out = _epilogue_operands(lora_act, lora_up, out, m, n, dtype, dev)
    if m == 0:
        return out
    t = [_dense(v) if v is not None else None for v in (acodes, ascales, wcodes, wscales)]
    rest = [_dense(v) if v is not None else None for v in (wcscales, bias, lora_act, lora_up)]
    with torch.cuda.device(dev):
        ext().gemm_nvfp4(*(_ptr(v) for v in t), float(alpha), *(_ptr(v) for v in rest), out.data_ptr(), m, n, k,
                         rank, DTYPES[dtype], _stream(dev))
    return out


def w4a4_nvfp4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor, alpha: float,
                      dtype: torch.dtype, wcscales: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                      lora_down_t: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] in dtype for x [..., K] (cast to dtype): quantize_nvfp4, then gemm_nvfp4. Bit-identical to
    dcc.targets.nunchaku.cuda_numerics.w4a4_nvfp4_linear_cuda."""
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    k = wcodes.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    codes, scales, lora_act = quantize_nvfp4(x.reshape(-1, k).to(dtype), smooth, lora_down_t)
    y = gemm_nvfp4(codes, scales, wcodes, wscales, alpha, dtype, wcscales, bias, lora_act,
                   lora_up if lora_act is not None else None)
    return y.reshape(*lead, wcodes.shape[0])
