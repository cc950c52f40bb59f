"""bench/scale.py's results: one row from a measured child (status, times, per-block times, the projection to the
real model's depth, memory), the merge into an existing scale.json (rows keyed by id), and the markdown table."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

# dcc's closing line (dcc/api.py)
COMPILED = re.compile(r"compiled (\d+) blocks in ([\d.]+)s \(passes: (.*?)\); peak RSS (\d+) MB")


def status(res: dict, tool: str) -> str:
    """ok | timed out | not importable: ... | refused/failed: <the child's last line>."""
    if res["timed_out"]:
        return "timed out"
    err = next((e["error"] for e in res["events"] if e.get("event") == "import_error"), None)
    if err:
        return f"not importable: {err}"
    if res["rc"] == 0:
        return "ok"
    last = next((ln.strip() for ln in reversed(res["tail"]) if ln.strip()), f"exit code {res['rc']}")
    # dcc's memory check and out-of-memory errors are one line naming the numbers (compiler/gpu_memory.py)
    kind = "refused" if tool == "dcc" and ("GB are free" in last or "ran out of memory" in last) else "failed"
    return f"{kind}: {last[:400]}"


def projection(blocks: list[float], wall: float, full: int) -> dict:
    """The time at the real model's depth: what is not spent in blocks (load, block 0's inputs, writing) stays, block
    0 keeps its own time (it pays the one capture of the block's graph), every further block costs the median of
    blocks 1..n-1. With a timed-out row `wall` covers only the blocks done, so the same formula holds."""
    if not blocks:
        return {}
    per = statistics.median(blocks[1:]) if len(blocks) > 1 else blocks[0]
    fixed = wall - sum(blocks)
    return {"block_first_s": round(blocks[0], 2), "block_median_s": round(per, 2), "fixed_s": round(fixed, 1),
            "projected_full_s": round(fixed + blocks[0] + per * (full - 1), 1), "projected_blocks": full}


def _block_steps(events: list[dict]) -> list[float]:
    """Each block's share of the wall time: from its start to the next block's start (its compile and what follows
    it, such as dcc's per-block checkpoint), the last one its compile plus the median of the others' extra. Events
    without start times (the peer's) are taken as they are."""
    secs = [e["seconds"] for e in events]
    starts = [e.get("start") for e in events]
    if len(events) < 2 or None in starts:
        return secs
    steps = [b - a for a, b in zip(starts, starts[1:])]
    extra = statistics.median(max(0.0, st - s) for st, s in zip(steps, secs))
    return [round(x, 3) for x in steps + [secs[-1] + extra]]


def _before_blocks(events: list[dict]) -> float | None:
    """Seconds from the child's start to its first block: dcc's first block's start, the peer's blocks_start."""
    for e in events:
        if e.get("event") == "block" and "start" in e:
            return e["start"]
        if e.get("event") == "blocks_start":
            return e["t"]
    return None


def summarise(row: dict, res: dict, full_blocks: int) -> dict:
    """The row's JSON: its identity, the measured numbers and the projection."""
    ev = res["events"]
    blocks = _block_steps([e for e in ev if e.get("event") == "block"])
    # llm-compressor's sequential pipeline has one subgraph more than the model has blocks (the final norm and
    # lm_head): its time counts with the fixed costs
    tail = blocks[row["blocks"]:]
    blocks = blocks[:row["blocks"]]
    end = next((e for e in ev if e.get("event") == "end"), {})
    out = {**row, "status": status(res, row["tool"]), "wall_s": res["wall_s"], "blocks_done": len(blocks),
           "block_s": blocks, **({"after_blocks_s": tail} if tail else {}), "peak_rss_mb": res["peak_rss_mb"],
           "gpu_torch_max_allocated_mb": end.get("gpu_max_allocated_mb"),
           "gpu_torch_max_reserved_mb": end.get("gpu_max_reserved_mb"),
           "gpu_smi_peak_mb": res["gpu_used_peak_mb"], "gpu_smi_before_mb": res["gpu_used_before_mb"]}
    out["block_compile_s"] = [e["seconds"] for e in ev if e.get("event") == "block" and "start" in e] or None
    per_block_alloc = [e["gpu_allocated_mb"] for e in ev if e.get("event") == "block" and "gpu_allocated_mb" in e]
    if per_block_alloc:
        out["gpu_block_allocated_mb"] = per_block_alloc
    m = COMPILED.search(res["text"])
    if m:
        out["dcc_blocks_s"] = float(m.group(2))
        out["dcc_passes_s"] = {k: float(v) for k, v in re.findall(r"([\w+]+) ([\d.]+)s", m.group(3))}
        out["dcc_peak_rss_mb"] = int(m.group(4))
    for e in ev:
        if e.get("event") == "phase":
            out[f"{e['name']}_s"] = e["seconds"]
        if e.get("event") == "import":
            out["peer_version"] = e.get("llmcompressor")
        if e.get("event") == "note":
            out.setdefault("notes", []).append(e["text"])
    wall = res["wall_s"]
    if res["timed_out"] and blocks:
        # cut short: the wall time ends inside a block, and what follows the blocks was never seen; the fixed part
        # is then the time before the first block alone, so the projection is a lower bound
        pre = _before_blocks(ev)
        if pre is not None:
            wall = pre + sum(blocks)
            out["projection_note"] = "lower bound: timed out, the work after the last block is not counted"
    out.update(projection(blocks, wall, full_blocks))
    if out["status"] != "ok":
        out["log_tail"] = res["tail"]
    return out


def merge(path: Path, new_rows: list[dict], skipped: list[dict]) -> tuple[list[dict], dict]:
    """Rows of the existing file (if any) with this run's replacing those of the same id; a row this run skipped is
    kept only where the file has none. Returns (rows, the file's other sections)."""
    old, extra = [], {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            old = doc.get("rows", [])
            extra = {k: v for k, v in doc.items() if k not in ("commit", "machine", "date", "command", "rows")}
        except ValueError:
            pass
    by = {r["id"]: r for r in old}
    for r in skipped:
        by.setdefault(r["id"], r)
    for r in new_rows:
        by[r["id"]] = r
    return list(by.values()), extra


def _gb(mb) -> str:
    return f"{mb / 1024:.1f}" if isinstance(mb, (int, float)) else "-"


def table(rows: list[dict]) -> str:
    """The markdown table of every row in the file."""
    head = ("| row | status | wall s | blocks | s/block (median) | projected s (blocks) | GPU torch peak GB | "
            "GPU smi peak GB | host peak RSS GB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        st = r["status"] if len(r["status"]) < 60 else r["status"][:57] + "..."
        proj = f"{r['projected_full_s']} ({r['projected_blocks']})" if "projected_full_s" in r else "-"
        blocks = f"{r.get('blocks_done', 0)}/{r['blocks']}"
        lines.append(f"| {r['id']} | {st} | {r.get('wall_s', '-')} | {blocks} | {r.get('block_median_s', '-')} | "
                     f"{proj} | {_gb(r.get('gpu_torch_max_allocated_mb'))} | {_gb(r.get('gpu_smi_peak_mb'))} | "
                     f"{_gb(r.get('peak_rss_mb'))} |")
    return "\n".join(lines)
