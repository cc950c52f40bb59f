"""Calibration inputs held in host memory ("spilled") when they do not fit the GPU beside the block (an 8B block's
linears read 26624 channels in all, 28 GB in float32 at 128 x 2048 tokens; a 70B block's down_proj alone 28672).
The collection run is the one full mode makes (compiler/context.py), chunk by chunk on the GPU, each chunk's input
rows copied into pinned host tensors; what passes read of them (compiler/stats.py: maxima, Gram sums over the
batch's leaves, row subsets) and the smoothing's rescale move a block of rows at a time back to the GPU and compute
there exactly what they would compute on the whole tensor: the same kernels on the same rows, so the artifact's bytes
are those of full mode (tests/compiler/test_spill.py)."""
from __future__ import annotations

import os

import torch

ROWS = 16384   # rows per move of a row-wise operation (a 28672-wide block is 1.9 GB in float32)
MODES = ("auto", "full", "lean", "spill")


def forced_mode() -> str:
    """$DCC_CALIB_MEMORY: auto (default: full where its estimate fits the GPU, else spill where the host has room,
    else lean), or one of them forced (tests and benchmarks; spill also works on the CPU, where it only copies)."""
    mode = os.environ.get("DCC_CALIB_MEMORY", "auto").strip() or "auto"
    if mode not in MODES:
        raise ValueError(f"DCC_CALIB_MEMORY={mode!r}: one of {', '.join(MODES)}")
    return mode


def host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, page-locked where a GPU is present (faster copies both ways) and pageable
    where it is not or pinning fails (a container's limits)."""
    if torch.cuda.is_available():
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy of x (a new tensor also when x is on the CPU: a spilled input is never a view of the block's
    tensors)."""
    out = host_empty(x.shape, x.dtype)
    out.copy_(x)
    return out


def blocks(n: int, size: int = ROWS):
    """(start, end) row ranges covering n rows."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def absmax(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[K] max over the rows of |x| computed on `device` a block of rows at a time (max is exact in any order)."""
    out = None
    for a, b in blocks(x.shape[0]):
        m = x[a:b].to(device).abs().amax(0)
        out = m if out is None else torch.maximum(out, m)
    return out if out is not None else torch.zeros(x.shape[1:], dtype=x.dtype, device=device)


def divide(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s (s broadcast over the rows, on the compute device) as a new host tensor, each block of rows divided on
    s's device: elementwise, so the same bits as one division of the whole tensor there."""
    out = host_empty(x.shape, x.dtype)
    for a, b in blocks(x.shape[0]):
        out[a:b].copy_(x[a:b].to(s.device) / s)
    return out
