"""The peer for bench/scale.py: llm-compressor's one-shot GPTQ (W4A16, symmetric int4 groups of 128) or AWQ (its
AWQ smoothing, then W4A16_ASYM: asymmetric int4 groups of 128), lm_head kept, on the same token windows dcc
calibrates on, the way its examples run it (the model loaded on the CPU, its sequential pipeline moving one layer
at a time to the GPU). Prints `SCALE {json}` events: the import's outcome, the recipe, one per calibrated layer,
the phase times and torch's CUDA peak.

    python bench/_scale_peer.py --model DIR --ids ids_16x256.pt --method gptq --out OUT
"""
from __future__ import annotations

import time

T0 = time.perf_counter()   # the "t" of the events counts from here, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402


def emit(**event) -> None:
    event["t"] = round(time.perf_counter() - T0, 3)
    print("SCALE " + json.dumps(event, default=str), file=sys.stderr, flush=True)


def recipe(method: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    if method == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    from llmcompressor.modifiers.transform.awq import AWQModifier
    return [AWQModifier(), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]


def describe(mods: list) -> list:
    """Each modifier's class and its settings as llm-compressor holds them (pydantic models)."""
    out = []
    for m in mods:
        try:
            fields = m.model_dump(exclude_none=True, exclude_defaults=False)
        except Exception as e:   # a modifier without pydantic's dump: say so, keep its repr
            fields = {"repr": repr(m), "dump_error": str(e)}
        # the settings only, not the lifecycle's state (initialized_, started_, ...) or its scheduling fields
        keep = {k: v for k, v in fields.items() if not k.startswith("_") and not k.endswith("_")
                and k not in ("index", "group", "start", "end", "update")}
        out.append({"modifier": type(m).__name__, **json.loads(json.dumps(keep, default=str))})
    return out


def _time_layers() -> None:
    """One event per sequential_epoch_end (a layer calibrated and quantized): the time since the previous one."""
    try:
        from llmcompressor.core import LifecycleCallbacks
    except ImportError:
        return
    orig = LifecycleCallbacks.sequential_epoch_end
    last = [time.perf_counter()]

    def timed(*args, **kwargs):
        out = orig(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        emit(event="block", seconds=round(now - last[0], 3))
        last[0] = now
        return out
    LifecycleCallbacks.sequential_epoch_end = staticmethod(timed)
    emit(event="blocks_start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="a [chunks, seq_len] LongTensor saved with torch.save")
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        mods = recipe(args.method)
    except Exception as e:   # recorded in the results, not fatal to the benchmark
        emit(event="import_error", error=f"{type(e).__name__}: {e}")
        sys.exit(3)
    emit(event="import", llmcompressor=llmcompressor.__version__, seconds=round(time.perf_counter() - t0, 2),
         recipe=describe(mods))
    from transformers import AutoModelForCausalLM
    ids = torch.load(args.ids)
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    emit(event="phase", name="load", seconds=round(time.perf_counter() - t, 2))
    _time_layers()
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=mods, max_seq_length=seq_len, num_calibration_samples=n,
            shuffle_calibration_samples=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    emit(event="phase", name="oneshot", seconds=round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    emit(event="phase", name="save", seconds=round(time.perf_counter() - t, 2))
    peak = (torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20) \
        if torch.cuda.is_available() else (0.0, 0.0)
    emit(event="end", gpu_max_allocated_mb=round(peak[0]), gpu_max_reserved_mb=round(peak[1]))


if __name__ == "__main__":
    main()
