"""bench/e2e.py --profile: where one decode step (a CUDA graph replay) and one prefill spend their GPU time.
torch.profiler (CUPTI) records the kernels a graph replay launches; per kernel name: calls and GPU microseconds per
step, beside the step's wall time, so that the gap (launch, host sync, idle) and the kernels that dominate are read
off one table. Written as markdown to $OUT (or printed)."""
from __future__ import annotations

import time
from collections import defaultdict

import torch


def _kernels(prof) -> dict[str, list[float]]:
    """kernel name -> [calls, total device us] over the profile."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            a = acc[e.name]
            a[0] += 1
            a[1] += e.device_time_total
    return acc


def _table(title: str, acc: dict, reps: int, wall_us: float, top: int = 18) -> str:
    busy = sum(v[1] for v in acc.values()) / reps
    out = [f"### {title}", "",
           f"wall {wall_us:.1f} us per run, kernels {busy:.1f} us ({100 * busy / wall_us:.0f}% busy), "
           f"{sum(v[0] for v in acc.values()) / reps:.0f} kernels per run", "",
           "| kernel | calls/run | us/run | share |", "|---|---|---|---|"]
    for name, (n, us) in sorted(acc.items(), key=lambda kv: -kv[1][1])[:top]:
        out.append(f"| {name[:110]} | {n / reps:.0f} | {us / reps:.1f} | {100 * us / reps / busy:.1f}% |")
    return "\n".join(out) + "\n"


def profile_decode(lm, batch: int, context: int, reps: int = 20) -> str:
    """Profile `reps` replays of the decode step graph at `batch` with `context` cached positions."""
    from dcc.runtime.fastlm.graph import StepGraph
    lm.allocate(batch, context + 2 * reps + 16)   # the graph advances the positions: warm-up, timing, profile
    dev = lm.device
    tok = torch.randint(3, 1000, (batch,), device=dev)
    pos = torch.full((batch,), context, dtype=torch.long, device=dev)
    g = StepGraph(lm, tok, pos, advance=True)
    for _ in range(3):
        g()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / reps * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g()
        torch.cuda.synchronize()
    return _table(f"decode step, batch {batch}, context {context}", _kernels(prof), reps, wall)


def profile_prefill(lm, n: int, reps: int = 3) -> str:
    """Profile `reps` prefills of an n-token prompt (batch 1), eager."""
    ids = torch.randint(3, 1000, (1, n), device=lm.device)
    lm.allocate(1, n + 1)
    lm.prefill(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        lm.prefill(ids)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / reps * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            lm.prefill(ids)
        torch.cuda.synchronize()
    lm.cache = None
    return _table(f"prefill of {n} tokens, batch 1", _kernels(prof), reps, wall)
