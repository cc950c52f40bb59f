"""bench/e2e.py --profile: where one decode step (a CUDA graph replay) and one prefill spend their GPU time.
torch.profiler (CUPTI) records the kernels a graph replay launches; per kernel name: calls and GPU microseconds per
step, beside the step's wall time, so that the gap (launch, host sync, idle) and the kernels that dominate are read
off one table. Written as markdown to $OUT (or printed).

With programmatic dependent launch a kernel starts before the one ahead of it ends and waits inside, so its GPU time
counts that wait too. The column "critical us/run" is what each kernel adds to the step instead: kernels in start
order, each credited with how far it moves the latest end seen so far (end_i - max(end_j, j < i), at least 0). These
sum to the span from the first start to the last end, gaps included."""
from __future__ import annotations

import time
from collections import defaultdict

import torch


def critical_path(spans: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """(name, start, end) per kernel -> name -> [calls, total duration, critical-path share] (module docstring)."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    last = None
    for name, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        a = acc[name]
        a[0] += 1
        a[1] += end - start
        a[2] += end - start if last is None else max(0.0, end - last)   # an idle gap before it counts too
        last = end if last is None else max(last, end)
    return acc


def _kernels(prof) -> dict[str, list[float]]:
    """kernel name -> [calls, total device us, critical-path us] over the profile."""
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    return critical_path(spans)


def _table(title: str, acc: dict, reps: int, wall_us: float, top: int = 18) -> str:
    busy = sum(v[1] for v in acc.values()) / reps
    out = [f"### {title}", "",
           f"wall {wall_us:.1f} us per run, kernels {busy:.1f} us ({100 * busy / wall_us:.0f}% busy), "
           f"{sum(v[0] for v in acc.values()) / reps:.0f} kernels per run", "",
           "| kernel | calls/run | us/run | share | critical us/run |", "|---|---|---|---|---|"]
    for name, (n, us, crit) in sorted(acc.items(), key=lambda kv: -kv[1][2])[:top]:
        out.append(f"| {name[:110]} | {n / reps:.0f} | {us / reps:.1f} | {100 * us / reps / busy:.1f}% "
                   f"| {crit / reps:.1f} |")
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
