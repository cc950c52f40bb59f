"""`dcc compile ARGS` run in this process, as bench/scale.py's child, with two measurements dcc does not print: each
block's compile time (CUDA synchronised at both ends) and torch's CUDA peak (allocated and reserved), printed as
`SCALE {json}` lines on stderr. A block's time is its compile; what dcc does between blocks (the checkpoint it saves
after each one) shows in the gaps between the blocks' start times. It wraps the block compiler's method rather than
edit dcc; if that method has been renamed, the compile still runs and one event says the per-block times are missing.

    python bench/_scale_child.py compile MODEL -o OUT --target qserve --calib calib.txt --device cuda -q
"""
from __future__ import annotations

import time

T0 = time.perf_counter()   # times in the events count from here, before torch and dcc are imported

import atexit  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from dcc.compiler import sequential  # noqa: E402


def emit(**event) -> None:
    print("SCALE " + json.dumps(event), file=sys.stderr, flush=True)


class _Peaks:
    """torch's CUDA peaks: per block (the allocator's peak is reset at each block's start) and over the run."""
    allocated = reserved = 0.0

    @classmethod
    def take(cls) -> tuple[float, float]:
        if not torch.cuda.is_initialized():
            return 0.0, 0.0
        a, r = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
        cls.allocated, cls.reserved = max(cls.allocated, a), max(cls.reserved, r)
        return a, r


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(compile_block):
    def compile(self, *args, **kwargs):
        i, prefix = (list(args[:2]) + [kwargs.get("i"), kwargs.get("prefix")][len(args[:2]):])[:2]
        _sync()
        _Peaks.take()   # what ran before this block (block 0's inputs, the previous block's hand-over)
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = compile_block(self, *args, **kwargs)
        _sync()
        a, r = _Peaks.take()
        emit(event="block", index=i, prefix=prefix, start=round(t - T0, 3), seconds=round(time.perf_counter() - t, 3),
             gpu_allocated_mb=round(a), gpu_reserved_mb=round(r))
        return out
    return compile


def _at_exit() -> None:
    _Peaks.take()
    emit(event="end", gpu_max_allocated_mb=round(_Peaks.allocated), gpu_max_reserved_mb=round(_Peaks.reserved))


def main() -> None:
    compiler = getattr(sequential, "_BlockCompiler", None)
    if compiler is not None and callable(getattr(compiler, "compile", None)):
        compiler.compile = _timed(compiler.compile)
    else:
        emit(event="note", text="dcc.compiler.sequential._BlockCompiler.compile not found: no per-block times")
    atexit.register(_at_exit)
    emit(event="start", time=time.time())
    from dcc.cli.main import main as dcc
    dcc(sys.argv[1:], prog_name="dcc")


if __name__ == "__main__":
    main()
