"""GPU memory of a compile: checked before the work against what the device has free, and an out-of-memory error in
a block turned into one line naming the block, what it holds and what to change, instead of the allocator's
traceback. Host memory needs no such check: a block's weights are read from memory-mapped files and the artifact's
tensors are spooled to disk as they are written (targets/spool.py)."""
from __future__ import annotations

import torch


class GpuMemoryError(RuntimeError):
    """The GPU cannot hold one block's work; the message names the device, the block and the numbers."""


ADVICE = ("fewer calibration tokens (--calib-chunks, --calib-seq-len: the activations grow with them), "
          "or --device cpu")


def free_and_total_mb(device: torch.device) -> tuple[float, float]:
    free, total = torch.cuda.mem_get_info(device)
    return free / 2**20, total / 2**20


def check_fits(device: str | torch.device, need_mb: float, parts: str) -> None:
    """Refuse, before any work, a compile whose one-block estimate (`need_mb`, made of `parts`) exceeds the free
    memory of a CUDA device. The estimate is an upper one (api.estimate_memory_mb: float32 weights twice, every
    linear's inputs counted though some share one copy), so this only refuses what cannot fit."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    free, total = free_and_total_mb(dev)
    if need_mb > free:
        raise GpuMemoryError(f"--device {device}: one block needs about {need_mb / 1024:.1f} GB ({parts}) but "
                             f"{free / 1024:.1f} GB of the GPU's {total / 1024:.1f} GB are free; use {ADVICE}")


def out_of_memory(device: torch.device, block: str, err: BaseException) -> GpuMemoryError:
    """The one-line error for a CUDA out-of-memory error raised while compiling `block` (raw, or wrapped by the pass
    manager, whose message names the pass)."""
    oom = _oom_in(err)
    try:
        free, total = free_and_total_mb(device)
        state = f"{free / 1024:.1f} GB of {total / 1024:.1f} GB free after it"
    except Exception:   # the device may be unusable after the error: say what is known
        state = "the device's free memory could not be read"
    first = str(oom).splitlines()[0] if str(oom) else type(oom).__name__
    first = first.split(". ")[0]   # the allocator's sentence, without its paragraph of settings advice
    during = ""
    if err is not oom and str(err).startswith("pass "):
        during = f" in {str(err).split(' failed')[0]}"
    return GpuMemoryError(f"block {block}: the GPU ran out of memory{during} ({first}; {state}); use {ADVICE}")


def _oom_in(err: BaseException | None) -> BaseException | None:
    while err is not None and not isinstance(err, torch.OutOfMemoryError):
        err = err.__cause__
    return err


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA OOM error, also when a pass wrapped it (PassError keeps it as its cause)."""
    return _oom_in(err) is not None
