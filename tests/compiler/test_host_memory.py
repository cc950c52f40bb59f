"""Freed heap pages go back to the system between blocks: memory freed below a live allocation stays resident until
the allocator is trimmed (glibc keeps it for reuse), and release_free_pages() returns it."""
import sys

import pytest
import torch

from dcc.compiler.host_memory import release_free_pages


def _rss_anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_freed_pages_below_a_live_allocation_are_returned():
    if not release_free_pages():
        pytest.skip("this C library has no malloc_trim (not glibc)")
    # 100 KB tensors sit on the heap (below glibc's 128 KB mmap threshold); the last one stays alive, so free()
    # cannot shrink the heap from its top
    chunks = [torch.ones(25_000) for _ in range(2_000)]   # about 200 MB
    keep = chunks[-1]
    del chunks
    before = _rss_anon_mb()
    assert release_free_pages()
    after = _rss_anon_mb()
    assert before - after > 100, (before, after)
    assert float(keep[0]) == 1.0
