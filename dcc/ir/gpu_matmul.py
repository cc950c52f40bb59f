"""The precision of the float32 matrix products in a block's graph runs on a GPU (calibration's forwards: the run
that collects the linears' inputs and the one that computes the quantized block's output). "fp32" (default): what
torch computes with TF32 off, about 50 TFLOP/s on an H100, so two forwards of an 8B block on 128 x 2048 tokens
(2 x 114 TFLOP) took 5.4 of its 7.9 s of AWQ. "3xtf32": each product as three TF32 tensor-core products of the
operands' split halves, a = a_hi + a_lo with a_hi the TF32 part (10 mantissa bits, exact in TF32) and a_lo the rest:
a b ~ a_hi b_hi + (a_hi b_lo + a_lo b_hi), dropping a_lo b_lo (~2^-22 of each product) and TF32's rounding of the lo
parts (~2^-11 of 2^-11): relative errors of about 1e-6, against 6e-8 for float32 and 5e-4 for one TF32 product,
accumulated in float32 -- the method passes/gptq.py's gram uses for X^T X. The artifact then differs from an
fp32-product compile in low bits (as any GPU compile differs from a CPU one); its quality must be checked
(bench/scale.py reports the time, bench/gpu_matmul_accuracy.py the perplexity). "tf32": one TF32 tensor-core product
of the operands cut to TF32 (tf32_part), accumulated in float32: about 5e-4 relative error per product, a third of
3xtf32's tensor work (llm-compressor's calibration forwards run in bf16, about 4e-3).

Products on the CPU, and in any other dtype, are left alone."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MODES = ("fp32", "3xtf32", "tf32")
_mode = "fp32"
_cpu_too = False   # tests: apply the split on the CPU (where the products stay float32: only the split is checked)


def tf32_part(v: torch.Tensor) -> torch.Tensor:
    """v with its float32 mantissa cut to TF32's 10 bits (exactly representable in TF32: the tensor cores use it
    unrounded)."""
    return (v.view(torch.int32) & -8192).view(torch.float32)   # -8192 = 0xFFFFE000: sign, exponent, 10 bits


def mm3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (float32 matrices) by three TF32 products, summed as hi hi + (hi lo + lo hi)."""
    a_hi, b_hi = tf32_part(a.contiguous()), tf32_part(b.contiguous())
    a_lo, b_lo = a - a_hi, b - b_hi   # exact: the bits the TF32 parts dropped
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        cross = torch.mm(a_hi, b_lo)
        cross.add_(torch.mm(a_lo, b_hi))
        return torch.mm(a_hi, b_hi).add_(cross)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def mm1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (float32 matrices) as one TF32 product: the operands cut to TF32 (so every GPU gives the products the
    same operands, whatever its own float32 -> TF32 conversion rounds to), the products exact in float32."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.mm(tf32_part(a.contiguous()), tf32_part(b.contiguous()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


class _Split(TorchDispatchMode):
    """Routes float32 mm and addmm (what linear and matmul decompose to) through the mode's product (mm3, mm1)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            mats = args[-2:]
            if all(t.dtype == torch.float32 and (t.is_cuda or _cpu_too) for t in mats):
                beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
                product = mm1 if _mode == "tf32" else mm3
                if func is torch.ops.aten.mm.default and not kwargs:
                    self.calls += 1
                    return product(*mats)
                if beta == 1 and alpha == 1:   # addmm(bias, a, b): bias + a @ b
                    self.calls += 1
                    return product(*mats).add_(args[0])
        return func(*args, **kwargs)


def check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--gpu-matmul {mode!r}: one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def using(mode: str):
    """Graph runs inside use `mode` (compiler/sequential.py sets it for a compile)."""
    global _mode
    prev, _mode = _mode, check(mode)
    try:
        yield
    finally:
        _mode = prev


@contextlib.contextmanager
def exact():
    """Graph runs inside use float32 products whatever the compile asked: the function-preservation checks, which
    compare two runs to 1e-3 (one TF32 product alone is off by about 5e-4)."""
    global _mode
    prev, _mode = _mode, "fp32"
    try:
        yield
    finally:
        _mode = prev


@contextlib.contextmanager
def products():
    """Around a graph run: the split products where the compile asked for them, else nothing."""
    if _mode == "fp32":
        yield None
        return
    with _Split() as m:
        yield m
