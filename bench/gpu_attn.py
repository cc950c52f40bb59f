"""Decode attention alone (csrc/attn's decode_attention_kernel, the fused form dcc generate runs: RoPE of the step's
q and k, the new K/V written, attention over the cache), Llama-3-8B heads (32 query, 8 KV, head 128), a context of
256 slots in a cache of 384 (the e2e benchmark's 128 + 256), KV4 and bf16 caches, batch 1 and 64: microseconds per
launch from a CUDA graph of 32 launches (one per layer, each its own cache; gpu_w4a16's time_calls), for each split
size the kernel may take (batch 1: the split rule down to DCC_ATTN_MIN_CHUNK; larger batches: DCC_ATTN_CHUNK forcing
32 to 256 slots, where the rule keeps 256), beside the bytes floor (the cache slots read at the measured copy
bandwidth). The launches overlap as the decode step's do (programmatic dependent launch on sm_90; DCC_PDL=0: plain
launches). bench/results/gpu_attn.json holds the newest run (csrc/attn/DESIGN.md cites it); the run that chose the
kernel's form (its "variant" rows) is that file as of commit bae5108.

    PYTHONPATH=. python bench/gpu_attn.py [--batches 1,64]

JSON (bench/_results.py) to $OUT/gpu_attn.json if $OUT is set, else bench/results/gpu_attn.json."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_w4a16 import ceilings, time_calls  # noqa: E402  (bench/gpu_w4a16.py: the same ceilings and timing)
H, KVH, D, CAP, CTX, LAYERS = 32, 8, 128, 384, 256, 32


def bench_one(kind: str, batch: int, min_chunk: int, chunk: int = 0) -> dict:
    """One row; chunk > 0 forces that split size (DCC_ATTN_CHUNK), else the split rule with min_chunk."""
    from dcc.runtime.fastlm import cache as C
    os.environ["DCC_ATTN_MIN_CHUNK"] = str(min_chunk)
    os.environ["DCC_ATTN_CHUNK"] = str(chunk)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if kind == "kv4":
        c = C.KV4Cache(LAYERS, batch, KVH, CAP, D, H, "cuda", sms=sms)
        for t in (c.kc, c.vc):
            t.random_(0, 256)
        for t in (c.ks, c.vs):
            t.fill_(0.01)
        for t in (c.kz, c.vz):
            t.fill_(8.0)
        dt, slot_bytes = torch.float16, D + 8   # K and V: D/2 code bytes and an fp16 scale and zero each
    else:
        dt = torch.bfloat16
        c = C.KV16Cache(LAYERS, batch, KVH, CAP, D, H, "cuda", dt, sms=sms)
        c.k.normal_()
        c.v.normal_()
        slot_bytes = 4 * D
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, (H + 2 * KVH) * D, device="cuda", dtype=dt, generator=gen)
    pos = torch.full((batch,), CTX - 1, device="cuda", dtype=torch.long)
    ang = torch.rand(CAP, D, device="cuda", generator=gen)
    cos, sin = ang.cos(), ang.sin()
    # bench/gpu_w4a16.py's timing: one graph of the 32 launches, median per launch over replays
    us, _, _ = time_calls([lambda layer=layer: c.decode(layer, qkv, pos, cos, sin) for layer in range(LAYERS)], reps=20)
    return {"cache": kind, "batch": batch, "chunk": c.chunk, "splits": c.splits, "ctas": batch * KVH * c.splits,
            "us": round(us, 2), "bytes": batch * KVH * CTX * slot_bytes}


def run_all(batches: list[int]) -> list[dict]:
    rows = []
    for kind in ("kv4", "bf16"):
        for b in batches:
            # batch 1: the split rule down to each minimum; larger batches: each split size forced (the rule keeps
            # 256-slot chunks there, whose CTAs stream 256 slots with two passes of loads in flight)
            runs = [(mc, 0) for mc in (16, 32, 64, 128, 256)] if b == 1 else [(16, c) for c in (32, 64, 128, 256)]
            for mc, forced in runs:
                r = bench_one(kind, b, mc, forced)
                rows.append(r)
                print(f"  {kind:4} batch {b:3} chunk {r['chunk']:3} splits {r['splits']:2} CTAs {r['ctas']:5}: "
                      f"{r['us']:7.2f} us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    import _results
    bw = ceilings()[0]   # the device copy's TB/s, read + write
    print(f"device copy {bw:.2f} TB/s (read + write):", flush=True)
    pdl = os.environ.get("DCC_PDL", "1") != "0"
    rows = [dict(r, pdl=pdl) for r in run_all(batches)]
    for r in rows:
        r["floor_us"] = round(r["bytes"] / (bw / 2 * 1e12) * 1e6, 2)   # reads at the copy's one-way bandwidth
    out = Path(os.environ["OUT"]) / "gpu_attn.json" if os.environ.get("OUT") else None
    path = _results.write("gpu_attn", rows, out=out, copy_TBps=round(bw, 3), heads=H, kv_heads=KVH, head_dim=D,
                          capacity=CAP, context=CTX, layers_per_graph=LAYERS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
