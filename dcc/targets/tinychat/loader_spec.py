"""What TinyChat reads and runs, written down from mit-han-lab/llm-awq d6e797a as a spec an artifact is checked
against (the manifest's `engines` comes from it):

- awq/quantize/qmodule.py WQLinear(w_bit=4, group_size=128): asserts K % 128 == 0, N % 8 == 0 (and N % 4); buffers
  qweight int16 [N/4, K], scales and scaled_zeros [8 * ceil(K / 128 / 8), N] in the model dtype, bias [N] if any.
  Every linear of the decoder layers becomes a WQLinear (a 16-bit one has no place to load into).
- WQLinear.forward: GEMV (gemv_forward_cuda_new) below 8 tokens, else GEMM (gemm_forward_cuda_new).
- awq/kernels/csrc/quantization_new/gemm/gemm_cuda.cu: grid N / 128 CTAs (truncating: N % 128 columns never
  written); the main loop masks its loads with k_0_0_ld < gemm_iters but the prologue loads STAGES - 1 tiles of
  CTA_K unmasked from cta_offset_k = z * K / SPLITK; gemm_iters = ceil(K / CTA_K) / SPLITK (integer division).
  Tiles by tokens M: M <= 32: CTA_K 128, SPLITK 2, STAGES 4; M <= 64: 128, 1, 3; M <= 128: 128, 1, 4; larger:
  64, 1, 4. So at 8 <= M <= 32 a K that is not a multiple of 256 skips k tiles (wrong outputs), and K < 768 makes the
  second split's prologue read past K (past the operands at the last rows); larger M reads past below K = 256, 384,
  192."""
from __future__ import annotations

import torch

GROUP = 128
# (tokens, CTA_K, SPLITK, STAGES) of gemm_forward_cuda_new's tiles, smallest M first
GEMM_TILES = (("8-32", 128, 2, 4), ("33-64", 128, 1, 3), ("65-128", 128, 1, 4), ("129+", 64, 1, 4))


def kernel_problems(n: int, k: int) -> list[str]:
    """Why TinyChat's W4A16 kernels cannot run an [N, K] layer correctly and in bounds at every token count ([] if
    they can)."""
    out = []
    if k % GROUP:
        out.append(f"K = {k} is not a multiple of 128 (WQLinear asserts it; the kernels' group is 128)")
    if n % 8:
        out.append(f"N = {n} is not a multiple of 8 (WQLinear asserts it)")
    if n % 128:
        out.append(f"N = {n} is not a multiple of 128: the GEMM (8+ tokens) never writes the last {n % 128} "
                   f"output columns")
    for tokens, ck, split, stages in GEMM_TILES:
        tokens = f"{tokens} tokens"
        if k % (ck * split):
            out.append(f"K = {k} is not a multiple of {ck * split}: the GEMM at {tokens} skips k tiles (split-K "
                       f"{split}, wrong outputs)")
        reach = k // split * (split - 1) + (stages - 1) * ck
        if reach > k:
            out.append(f"K = {k}: the GEMM at {tokens} preloads {stages - 1} k tiles of {ck} unmasked from "
                       f"{k // split * (split - 1)}, reading past K (up to {reach})")
    return out


def expected(n: int, k: int, dtype: torch.dtype, bias: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of the WQLinear buffers the loader fills."""
    rows = 8 * -(-(k // GROUP) // 8)
    out = {"qweight": (torch.int16, (n // 4, k)), "scales": (dtype, (rows, n)), "scaled_zeros": (dtype, (rows, n))}
    if bias:
        out["bias"] = (dtype, (n,))
    return out


def check(tensors, layers: dict[str, dict], dtype: torch.dtype) -> list[str]:
    """Problems (one line each) between an artifact's tensors / manifest layers and what TinyChat loads and runs;
    tensors None: the layers only (shapes, group size, kernel limits), as at compile time."""
    problems = []
    have = set(tensors.keys()) if tensors is not None else set()
    for name, entry in layers.items():
        if "skip_reason" in entry:
            problems.append(f"{name}: kept 16-bit, but TinyChat makes every decoder linear a WQLinear")
            continue
        n, k = entry["shape"]
        if entry.get("spec", {}).get("group_size") != GROUP:
            problems.append(f"{name}: group size {entry.get('spec', {}).get('group_size')}, TinyChat's kernels take "
                            f"{GROUP}")
        for suffix, (dt, shape) in (expected(n, k, dtype, f"{name}.bias" in have) if tensors is not None
                                    else {}).items():
            key = f"{name}.{suffix}"
            if key not in have:
                problems.append(f"{key}: missing")
                continue
            t = tensors.get(key)
            if t.dtype != dt or tuple(t.shape) != shape:
                problems.append(f"{key}: {t.dtype} {tuple(t.shape)}, WQLinear holds {dt} {shape}")
        problems += [f"{name}: {p}" for p in kernel_problems(n, k)]
    return problems
