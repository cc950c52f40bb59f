"""How many int8 codes of QServe's fused kernels can depend on the approximate instructions that dcc's CPU emulation
(dcc/targets/qserve/numerics_fused.py) replaces by correctly rounded results: each MUFU result (RSQ, RCP, EX2) is moved
by up to its error bound in ulps, and the codes (and fp16 values) that change under some choice of moves are counted.

    OMP_NUM_THREADS=2 .venv/bin/python bench/qserve_fused_stand_ins.py --tokens 4096 --hidden 4096
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json

import torch

from dcc.targets.qserve import numerics, numerics_fused as F


def shifted(fn, ulps: int):
    """fn's float32 result moved by `ulps` units in the last place (toward +inf for ulps > 0)."""
    def wrapped(v):
        out = fn(v)
        toward = torch.full_like(out, float("inf") if ulps > 0 else -float("inf"))
        for _ in range(abs(ulps)):
            out = torch.nextafter(out, toward)
        return out
    return wrapped


@contextlib.contextmanager
def moved(**ulps):
    """numerics_fused's stand-ins (rcp, rsqrt, ex2) shifted by the given ulps while inside."""
    saved = {name: getattr(F, name) for name in ulps}
    try:
        for name, k in ulps.items():
            setattr(F, name, shifted(saved[name], k))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def residual(t: int, h: int, seed: int) -> torch.Tensor:
    """Normal channels, 8 outlier channels x 40, a per-token offset: fp16 values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    x[:, torch.randperm(h, generator=g)[:8]] *= 40
    return (x + 0.5 * torch.randn(t, 1, generator=g)).half().float()


def norm_counts(x: torch.Tensor, rsq_ulps: int, rcp_ulps: int, rcp_h_ulps: int) -> dict:
    w = torch.ones(x.shape[1])
    base = F.quantize_normed(F.layernorm_f32(x, w, 1e-5))
    changed = torch.zeros(x.shape, dtype=torch.bool)
    scale_changed = torch.zeros(x.shape[0], dtype=torch.bool)
    sum_changed = torch.zeros(x.shape[0], dtype=torch.bool)
    ys = {}
    for rs, rh in itertools.product(range(-rsq_ulps, rsq_ulps + 1), range(-rcp_h_ulps, rcp_h_ulps + 1)):
        with moved(rsqrt=rs, rcp=rh):
            ys[(rs, rh)] = F.layernorm_f32(x, w, 1e-5)
    for (rs, rh), y in ys.items():
        for ra in range(-rcp_ulps, rcp_ulps + 1):
            if rs == rh == ra == 0:
                continue
            with moved(rcp=ra):
                a = F.quantize_normed(y)
            changed |= a.codes != base.codes
            scale_changed |= (a.scale != base.scale).reshape(-1)
            sum_changed |= (a.sum != base.sum).reshape(-1)
    return {"codes": int(changed.sum()), "of": x.numel(), "scales": int(scale_changed.sum()),
            "sums": int(sum_changed.sum()), "tokens": x.shape[0]}


def silu_counts(gate: torch.Tensor, up: torch.Tensor, ex2_ulps: int, rcp_ulps: int) -> dict:
    base = F.silu_and_mul(gate, up)
    base_q = numerics.quantize_tokens(base)
    out_changed = torch.zeros(gate.shape, dtype=torch.bool)
    code_changed = torch.zeros(gate.shape, dtype=torch.bool)
    for e, r in itertools.product(range(-ex2_ulps, ex2_ulps + 1), range(-rcp_ulps, rcp_ulps + 1)):
        if e == r == 0:
            continue
        with moved(ex2=e, rcp=r):
            out = F.silu_and_mul(gate, up)
        out_changed |= out != base
        code_changed |= numerics.quantize_tokens(out).codes != base_q.codes
    return {"fp16_outputs": int(out_changed.sum()), "codes": int(code_changed.sum()), "of": gate.numel()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rsq-ulps", type=int, default=2)
    ap.add_argument("--ex2-ulps", type=int, default=2)
    ap.add_argument("--rcp-ulps", type=int, default=1)
    ap.add_argument("--rcp-h-ulps", type=int, default=0, help="also move MUFU.RCP(H) (exact for H a power of two)")
    args = ap.parse_args()
    total_norm, total_silu = {}, {}
    for c0 in range(0, args.tokens, args.chunk):
        t = min(args.chunk, args.tokens - c0)
        x = residual(t, args.hidden, seed=c0)
        for k, v in norm_counts(x, args.rsq_ulps, args.rcp_ulps, args.rcp_h_ulps).items():
            total_norm[k] = total_norm.get(k, 0) + v
        g = torch.Generator().manual_seed(10_000 + c0)
        gate = (torch.randn(t, args.hidden, generator=g) * 2).half().float()
        up = torch.randn(t, args.hidden, generator=g).half().float()
        for k, v in silu_counts(gate, up, args.ex2_ulps, args.rcp_ulps).items():
            total_silu[k] = total_silu.get(k, 0) + v
    print(json.dumps({"args": vars(args), "rms_norm_general_fuse_sum": total_norm, "silu_and_mul": total_silu}))


if __name__ == "__main__":
    main()
