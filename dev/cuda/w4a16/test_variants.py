"""GPU tests of the benchmark-only W4A16 GEMV variants (module dcc_w4a16_dev): each computes what the product's
kernels compute, against the float64 reference of tests/runtime/test_cuda_w4a16.py (whose helpers it reuses).

    python -m pytest dev/cuda/w4a16/test_variants.py -q
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

DEV = Path(__file__).resolve().parents[1]
ROOT = DEV.parents[1]
sys.path.insert(0, str(DEV))
sys.path.insert(0, str(ROOT))


def _helpers():
    spec = importlib.util.spec_from_file_location("_w4a16_test_helpers", ROOT / "tests/runtime/test_cuda_w4a16.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


h = _helpers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ext():
    import dev_ext
    from dcc.runtime import cuda

    try:
        cuda.require()
        return dev_ext.load("w4a16")
    except cuda.CudaRuntimeUnavailable as e:
        if "nvcc failed" in str(e):  # a build error is a failure, not a skip
            raise
        pytest.skip(str(e).splitlines()[0])


@pytest.mark.parametrize("dtype", h.DTYPES, ids=["fp16", "bf16"])
def test_gemv_variants(ext, dtype):
    """The benchmark's alternative kernels and block shapes compute the same function."""
    gen = torch.Generator().manual_seed(h._seed("variants", str(dtype)))
    for (n, k, g) in ((448, 1152, 128), (132, 1088, 64)):  # K % 128 == 64 and N % 16 != 0 in the second
        _check_variants(ext, gen, dtype, n, k, g)
    # The persistent kernels (p_*): more row tiles than resident blocks (several tiles per block, the ring running
    # across tile boundaries), a partial last tile, K % 128 == 64, and a long K.
    for (n, k, g) in ((8196, 1088, 64), (1040, 14336, 128)):
        _check_variants(ext, gen, dtype, n, k, g, prefix="p_")
    # the l_* and lp_* kernels' shapes (lp_*: 8192 rows = 512 tiles, more than the resident blocks)
    for (n, k, g) in ((1024, 1152, 128), (2048, 2048, 64), (96, 14336, 128), (8192, 640, 32)):
        _check_variants(ext, gen, dtype, n, k, g, prefix="l")


def _check_variants(ext, gen, dtype, n, k, g, prefix=""):
    qw, s, sz = h.make_layer(n, k, g, dtype, gen)
    names = ext.gemv_variant_names()
    for v, m in itertools.product(range(len(names)), (1, 2, 3, 4, 7, 8, 13, 16)):
        if m > ext.gemv_variant_max_m(v) or not names[v].startswith(prefix):
            continue
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        try:
            ext.gemv_variant(v, x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(), m, n, k,
                             g, "float16" if dtype == torch.float16 else "bfloat16",
                             torch.cuda.current_stream().cuda_stream)
        except ValueError as e:  # shape-restricted variants (l_*: K % 128 == 0; p_*_m4: shared memory) say so
            assert "does not fit" in str(e), str(e)
            continue
        torch.cuda.synchronize()
        assert bool(torch.isfinite(out).all()), f"variant {v} {names[v]} N={n} K={k} M={m}"
        assert h.rel_err(out, h.reference(x, qw, s, sz, g)) < h.TOL[dtype], f"variant {v} {names[v]} N={n} K={k} M={m}"


@pytest.mark.parametrize("dtype", h.DTYPES, ids=["fp16", "bf16"])
def test_tail_split_is_correct_and_deterministic(ext, dtype):
    """v8 (lp8_w16: v7 with the last round's tiles cut into 2, 3 or 4 K ranges on other blocks; the last part to
    arrive adds them in a fixed order). Shapes with a tail of ~100 / ~80 / ~50 tiles beyond the resident blocks (264
    on an H100: split 2 / 3 / 4), and 14336 rows. Each output matches the float64 reference, and two launches give
    the same bits (the counters reset themselves)."""
    v8 = ext.gemv_variant_names().index("lp8_w16")
    slots = torch.cuda.get_device_properties(0).multi_processor_count * 2
    gen = torch.Generator().manual_seed(h._seed("split", str(dtype)))
    for tail, k, g in ((100, 1024, 128), (80, 1536, 64), (50, 512, 128), (None, 4096, 128)):
        n = 14336 if tail is None else 16 * (slots + tail)
        qw, s, sz = h.make_layer(n, k, g, dtype, gen)
        for m in (1, 3, 8):
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            outs = []
            for _ in range(2):
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                ext.gemv_variant(v8, x.data_ptr(), qw.data_ptr(), s.data_ptr(), sz.data_ptr(), 0, out.data_ptr(), m,
                                 n, k, g, "float16" if dtype == torch.float16 else "bfloat16",
                                 torch.cuda.current_stream().cuda_stream)
                torch.cuda.synchronize()
                outs.append(out)
            assert bool(torch.isfinite(outs[0]).all()), (n, k, m)
            assert h.rel_err(outs[0], h.reference(x, qw, s, sz, g)) < h.TOL[dtype], (n, k, m)
            assert torch.equal(outs[0], outs[1]), (n, k, m)
