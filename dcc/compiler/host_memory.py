"""Host memory between blocks. A block's float weights, its calibration activations and the passes' temporaries are
freed when the block is done, but glibc's allocator keeps most freed pages for reuse, and the next block's tensors of
slightly different sizes do not fit the holes exactly: without a trim the resident set grew by about 12 MB a block
(a Llama of width 1024: 692 MB at 8 blocks, 987 MB at 32, bench/memory.py). malloc_trim(0) hands the free pages back,
so the peak stays that of one block whatever the depth (733 MB at 8 blocks, 676 MB at 32). LazyModel.release calls it
after each block, in compiles and in streamed float models alike. host_room says whether the host can hold a
compile's spilled calibration inputs (compiler/spill.py)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        return lib if hasattr(lib, "malloc_trim") else None   # glibc only (not musl, not macOS)
    except OSError:
        return None


def release_free_pages() -> bool:
    """Return the allocator's free pages to the system (glibc malloc_trim); False where there is no such call."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


def host_room(need_mb: float) -> bool:
    """Whether the host's available memory (Linux's MemAvailable) holds need_mb with a 10 % margin; True where it
    cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    except (OSError, StopIteration, ValueError):
        return True
    return need_mb <= 0.9 * avail
