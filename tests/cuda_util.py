"""Shared by the GPU test files: build (or load) one kernel family's extension, skipping where the machine cannot
run it, but failing on a build error in csrc/ (a broken kernel must not look like a missing GPU)."""
import pytest


def require_family(family: str) -> None:
    from dcc.runtime import cuda
    try:
        cuda.require(family)
    except cuda.CudaRuntimeUnavailable as e:
        if "nvcc failed" in str(e):
            raise
        pytest.skip(str(e).splitlines()[0])
