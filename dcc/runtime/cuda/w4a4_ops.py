"""Torch-facing W4A4 ops on the GPU (Nunchaku INT4 and NVFP4, research/targets.md 3A): the activation kernel (smooth
division, per-group 4-bit codes and scales, the low-rank down-projection of the raw input) and the GEMM (exact int32
per group, fp32 group accumulation, bias and low-rank up-projection, one rounding to 16 bits). They pass data_ptr()s
and the current stream to csrc/w4a4 (module dcc_w4a4_ext), which never links libtorch.

Device layout the kernels read (unpacked once, at load: csrc/w4a4/DESIGN.md), row-major: INT4 weight codes int8
[N, K] (one code a byte) and wscales [N, K/64] in the layer's 16-bit dtype; NVFP4 weight codes uint8 [N, K] (e2m1 bit
patterns) and wscales uint8 [N, K/16] (e4m3 bytes; a float8_e4m3fn tensor is viewed as bytes), alpha a float and
wcscales [N] 16-bit; smooth [K], lora_down transposed [K, R], lora_up [N, R], bias [N] in the 16-bit dtype.

INT4 GEMMs take the Hopper wgmma kernel (csrc/w4a4/gemm_wgmma.cu, the same bits) where the GPU and the shape allow it
(sm_90, N % 64 == 0, K % 128 == 0), else the mma.sync kernel; the wgmma kernel reads the scales as fp32, group-major:
wscales_t [K/64, N] (wscales_t(), once per weight tensor: cached_wscales_t) and ascales_t [K/64, ld]
(quantize(..., scales_t=True), or ascales_t() from the 16-bit ascales); its fp8 variant (path "wgmma_fp8") reads the
codes as e4m3 bytes (codes_e4m3, quantize(..., fp8_codes=True))."""
from __future__ import annotations

import os

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


# ------------------------------------------------------------------------------- wgmma scale layouts (CPU too)

def scales_ld(m: int) -> int:
    """Row stride (floats) of ascales_t for M tokens: M rounded up to 16 (whole 16-token blocks, see tok_pos)."""
    return max(16, (m + 15) // 16 * 16)


def tok_pos(m: torch.Tensor) -> torch.Tensor:
    """Column of token m in ascales_t (csrc/w4a4/wgmma_kernel.cuh tok_pos): within each aligned 16-token block,
    m = 16a + 8b + 2t + e goes to 16a + 4t + 2b + e, so that a GEMM thread's four token scales are one 16-byte load."""
    return (m & ~15) | ((m & 6) << 1) | ((m >> 2) & 2) | (m & 1)


def wscales_t(wscales: torch.Tensor) -> torch.Tensor:
    """wscales [N, K/64] 16-bit -> fp32 [K/64, N] (group-major; each the exact fp32 value), for the wgmma GEMM."""
    if wscales.dim() != 2 or wscales.dtype not in DTYPES:
        raise ValueError(f"wscales must be 16-bit [N, K/64], got {wscales.dtype} {tuple(wscales.shape)}")
    return wscales.to(torch.float32).t().contiguous()


def codes_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """int8 4-bit codes (-8..15) -> uint8 e4m3 bytes of the same values (exact), the fp8 wgmma variant's operands."""
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    lut = torch.arange(-8, 16, dtype=torch.float32).to(torch.float8_e4m3fn).view(torch.uint8).to(codes.device)
    return lut[(codes.to(torch.int64) + 8).clamp(0, 23)]


def _cached(t: torch.Tensor, key: str, make):
    """make(t), kept on the tensor itself (an attribute; remade if t was modified in place), so that a layer's
    buffer pays a layout change once."""
    hit = getattr(t, key, None)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    val = make(t)
    setattr(t, key, (t._version, val))
    return val


def cached_wscales_t(wscales: torch.Tensor) -> torch.Tensor:
    return _cached(wscales, "_dcc_wscales_t", wscales_t)


def cached_codes_e4m3(wcodes: torch.Tensor) -> torch.Tensor:
    return _cached(wcodes, "_dcc_codes_e4m3", codes_e4m3)


def cached_lora_up_f32(lora_up: torch.Tensor) -> torch.Tensor:
    """lora_up [N, R] 16-bit -> its exact fp32 values (the wgmma_tc path's tensor-core operand), once per tensor."""
    return _cached(lora_up, "_dcc_lora_up_f32", lambda t: t.to(torch.float32).contiguous())


def ascales_t(ascales: torch.Tensor) -> torch.Tensor:
    """ascales [M, K/64] 16-bit -> fp32 [K/64, scales_ld(M)] (group-major, exact values, token m at column
    tok_pos(m), the other columns 0): what quantize(..., scales_t=True) writes beside the 16-bit scales."""
    if ascales.dim() != 2 or ascales.dtype not in DTYPES:
        raise ValueError(f"ascales must be 16-bit [M, K/64], got {ascales.dtype} {tuple(ascales.shape)}")
    m, groups = ascales.shape
    out = torch.zeros(groups, scales_ld(m), dtype=torch.float32, device=ascales.device)
    out[:, tok_pos(torch.arange(m, device=ascales.device))] = ascales.to(torch.float32).t()
    return out


def wgmma_supported(m: int, n: int, k: int) -> bool:
    """The Hopper wgmma GEMM runs M x N x K on the current GPU (sm_90 and the sm_90a build; N % 64, K % 128)."""
    if m < 1 or n % 64 or k % 128 or not torch.cuda.is_available():
        return False
    return bool(ext().gemm_wgmma_supported(m, n, k))


PATHS = ("auto", "mma", "wgmma", "wgmma_fp8", "wgmma_tc")


def _choose(path: str, m: int, n: int, k: int) -> str:
    """The GEMM path: auto -> wgmma where it runs (wgmma_fp8 when DCC_W4A4_FP8=1), else mma; DCC_W4A4_PATH (one of
    PATHS but auto) replaces auto, e.g. to run the mma.sync kernel through code that calls with path="auto". Both
    variables are read per call."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "auto" and os.environ.get("DCC_W4A4_PATH", "auto") in PATHS[1:]:
        path = os.environ["DCC_W4A4_PATH"]
    if path == "auto":
        if not wgmma_supported(m, n, k):
            return "mma"
        return "wgmma_fp8" if os.environ.get("DCC_W4A4_FP8") == "1" else "wgmma"
    if path != "mma" and not wgmma_supported(m, n, k):
        raise ValueError(f"the wgmma W4A4 GEMM cannot run M={m} N={n} K={k} on this GPU (sm_90, N % 64, K % 128)")
    if path == "wgmma_tc" and n % 128:
        raise ValueError(f"path wgmma_tc takes N % 128 == 0, got N = {n}")
    return path


def quantize(x: torch.Tensor, smooth: torch.Tensor | None = None, lora_down_t: torch.Tensor | None = None, *,
             unsigned: bool = False, shift: float | None = None, scales_t: bool = False, fp8_codes: bool = False):
    """x [M, K] fp16/bf16 on the GPU -> (codes int8 [M, K], ascales [M, K/64] in x's dtype, lora_act fp32 [M, R] or
    None), codes and scales bit-identical to dcc.ir.w4a4.quantize_act_int4(x, smooth, 64, unsigned, x.dtype, shift).
    smooth [K] (x's dtype) or None; lora_down_t [K, R] (x's dtype, R a multiple of 16) or None: the low-rank
    down-projection of the raw x. shift: default SHIFT_GELU when unsigned, else 0. scales_t: a fourth output, the
    scales as fp32 [K/64, scales_ld(M)] for the wgmma GEMM (token m at column tok_pos(m); padding columns unset).
    fp8_codes: the codes as uint8 e4m3 bytes (codes_e4m3 of them), for the wgmma_fp8 path."""
    x, smooth, lora_down_t, m, k, rank = _act_inputs(x, smooth, lora_down_t)
    shift = (SHIFT_GELU if unsigned else 0.0) if shift is None else float(shift)
    if shift and float(torch.tensor(shift, dtype=x.dtype)) != shift:
        raise ValueError(f"shift {shift} is not exactly representable in {x.dtype}")
    codes = torch.empty(m, k, dtype=torch.uint8 if fp8_codes else torch.int8, device=x.device)
    ascales = torch.empty(m, k // GROUP, dtype=x.dtype, device=x.device)
    lora_act = torch.empty(m, rank, dtype=torch.float32, device=x.device) if rank else None
    ld = scales_ld(m)
    # columns of tokens >= M stay unset: they reach only the accumulators of tokens >= M, whose outputs are dropped
    st = torch.empty(k // GROUP, ld, dtype=torch.float32, device=x.device) if scales_t else None
    res = (codes, ascales, lora_act, st) if scales_t else (codes, ascales, lora_act)
    if m == 0:
        return res
    e = ext()
    ws_bytes = e.quant_act_workspace(m, k, rank)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device) if ws_bytes else None
    with torch.cuda.device(x.device):
        e.quant_act(x.data_ptr(), _ptr(smooth), _ptr(lora_down_t if rank else None), codes.data_ptr(),
                    ascales.data_ptr(), _ptr(lora_act), _ptr(ws), ws_bytes, m, k, rank, DTYPES[x.dtype],
                    int(unsigned), shift, _stream(x.device), _ptr(st), ld if (scales_t or fp8_codes) else 0,
                    int(fp8_codes))
    return res


def gemm(acodes: torch.Tensor, ascales: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor,
         bias: torch.Tensor | None = None, lora_act: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
         *, out: torch.Tensor | None = None, path: str = "auto", ascales_f32t: torch.Tensor | None = None,
         wscales_f32t: torch.Tensor | None = None, wcodes_e4m3: torch.Tensor | None = None,
         lora_up_f32: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] in ascales' dtype: acodes int8 [M, K] and ascales [M, K/64] (quantize's), wcodes int8 [N, K],
    wscales [N, K/64], bias [N] or None, lora_act fp32 [M, R] with lora_up [N, R] or both None. path (PATHS):
    "auto" (wgmma where wgmma_supported, else mma), "mma" (mma.sync), "wgmma" (Hopper, s8 operands) or "wgmma_fp8"
    (Hopper, e4m3 operands: acodes may then be quantize(fp8_codes=True)'s uint8 bytes) or "wgmma_tc" (e4m3 operands,
    the third kernel, the low-rank branch on the tensor cores: N % 128 == 0, R % 32 == 0); forced paths raise
    ValueError where they cannot run. ascales_f32t / wscales_f32t / wcodes_e4m3 / lora_up_f32: the wgmma kernels'
    layouts (quantize(scales_t=True), wscales_t(), codes_e4m3(), lora_up in fp32); made here where not given. Every
    path but wgmma_tc gives the same bits; before its 16-bit rounding wgmma_tc differs from the exact result of the
    stored codes and scales by about 1e-6 of the magnitude of the output's terms at most
    (csrc/w4a4/wgmma3_kernel.cuh)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    fp8_in = acodes.dtype == torch.uint8 and path in ("wgmma_fp8", "wgmma_tc")
    if (acodes.dtype != torch.int8 and not fp8_in) or acodes.dim() != 2 or not acodes.is_cuda:
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
    path = _choose(path, m, n, k)
    if path == "wgmma_tc" and rank % 32:
        raise ValueError(f"path wgmma_tc takes ranks that are multiples of 32, got {rank}")
    if path == "mma":
        t = [_dense(v) if v is not None else None for v in (acodes, ascales, wcodes, wscales, bias, lora_act,
                                                            lora_up)]
        with torch.cuda.device(dev):
            ext().gemm(*(_ptr(v) for v in t), out.data_ptr(), m, n, k, rank, DTYPES[dtype], _stream(dev))
        return out
    fp8, tc = path in ("wgmma_fp8", "wgmma_tc"), path == "wgmma_tc"
    ast = ascales_t(ascales) if ascales_f32t is None else ascales_f32t
    wst = wscales_t(wscales) if wscales_f32t is None else wscales_f32t
    ld = ast.shape[1]
    _need("ascales_f32t", ast, torch.float32, (k // GROUP, ld), dev)
    _need("wscales_f32t", wst, torch.float32, (k // GROUP, n), dev)
    if ld < m or ld % 16:
        raise ValueError(f"ascales_f32t's rows hold {ld} tokens: at least M = {m}, a multiple of 16")
    a, w = acodes, wcodes
    if fp8:
        a = acodes if fp8_in else codes_e4m3(acodes)
        w = codes_e4m3(wcodes) if wcodes_e4m3 is None else wcodes_e4m3
        _need("wcodes_e4m3", w, torch.uint8, (n, k), dev)
    up32 = None
    if tc and rank:
        up32 = lora_up.to(torch.float32) if lora_up_f32 is None else lora_up_f32
        _need("lora_up_f32", up32, torch.float32, (n, rank), dev)
    t = [_dense(v) if v is not None else None for v in (a, ast, w, wst, bias, lora_act, lora_up, up32)]
    with torch.cuda.device(dev):
        ext().gemm_wgmma(_ptr(t[0]), _ptr(t[1]), ld, *(_ptr(v) for v in t[2:7]), out.data_ptr(), m, n, k, rank,
                         DTYPES[dtype], int(fp8), _stream(dev), int(tc), _ptr(t[7]))
    return out


def w4a4_linear(x: torch.Tensor, wcodes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor | None = None,
                lora_down_t: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, unsigned: bool = False, path: str = "auto") -> torch.Tensor:
    """y [..., N] in wscales' dtype for x [..., K] (cast to that dtype): quantize, then gemm. The weights as the
    device layout above (wcodes int8 [N, K], wscales [N, K/64], smooth [K], lora_down_t [K, R], lora_up [N, R],
    bias [N]); the wgmma paths' weight layouts are made once per tensor (cached_wscales_t, cached_codes_e4m3).
    path as gemm's. Bit-identical to dcc.targets.nunchaku.cuda_numerics.w4a4_int4_linear_cuda (but path wgmma_tc:
    within rounding of the exact result, gemm)."""
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    k = wcodes.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(wscales.dtype)
    m, n = x2.shape[0], wcodes.shape[0]
    path = _choose(path, m, n, k) if m > 0 else "mma"
    up = lora_up if lora_down_t is not None and lora_down_t.shape[-1] > 0 else None
    if path == "mma":
        codes, ascales, lora_act = quantize(x2, smooth, lora_down_t, unsigned=unsigned)
        y = gemm(codes, ascales, wcodes, wscales, bias, lora_act, up if lora_act is not None else None, path="mma")
    else:
        fp8 = path in ("wgmma_fp8", "wgmma_tc")
        codes, ascales, lora_act, ast = quantize(x2, smooth, lora_down_t, unsigned=unsigned, scales_t=True,
                                                 fp8_codes=fp8)
        up = up if lora_act is not None else None
        y = gemm(codes, ascales, wcodes, wscales, bias, lora_act, up, path=path,
                 ascales_f32t=ast, wscales_f32t=cached_wscales_t(wscales),
                 wcodes_e4m3=cached_codes_e4m3(wcodes) if fp8 else None,
                 lora_up_f32=cached_lora_up_f32(up) if path == "wgmma_tc" and up is not None else None)
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
