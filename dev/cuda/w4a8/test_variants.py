"""GPU tests of the benchmark-only W4A8 kernels (module dcc_w4a8_dev): the split-K kernel's other block shapes and
the stream-K kernel, bit-equal to the exact reference of tests/runtime/test_cuda_w4a8.py (whose helpers it reuses),
with repeated calls (each workspace must come back zero).

    python -m pytest dev/cuda/w4a8/test_variants.py -q
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

DEV = Path(__file__).resolve().parents[1]
ROOT = DEV.parents[1]
sys.path.insert(0, str(DEV))
sys.path.insert(0, str(ROOT))


def _helpers():
    spec = importlib.util.spec_from_file_location("_w4a8_test_helpers", ROOT / "tests/runtime/test_cuda_w4a8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


h = _helpers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def mods():
    import dev_ext
    from dcc.runtime import cuda
    from dcc.runtime.cuda import w4a8_ops

    try:
        cuda.require("w4a8")
        return w4a8_ops, dev_ext.load("w4a8")
    except cuda.CudaRuntimeUnavailable as e:
        if "nvcc failed" in str(e):  # a build error is a failure, not a skip
            raise
        pytest.skip(str(e).splitlines()[0])


@pytest.mark.parametrize("group", (0, 64))
def test_dev_kernels_exact(mods, group):
    """Split-K block shapes 1..5 (S chosen, and 4 with S forced), forced split counts of the default shape, and the
    stream-K kernel's four block shapes, each twice."""
    ops, dev = mods
    codes = [1 | (v << 4) for v in range(1, 6)] + [1 | (s << 8) for s in (1, 2, 3, 7)]
    codes += [1 | (4 << 4) | (1 << 8), 1 | (4 << 4) | (2 << 8)]
    codes += [3 | (v << 4) for v in range(4)] * 2
    workspaces = {}   # one zeroed buffer per kind: stream-K's accumulators overlap the split-K slots
    for n, k in ((192, 576), (1536, 576), (32, 4096)):
        for m in (1, 9, 16):
            gen = h._gen("variants", group, n, k, m)
            lay = h.make_layer(n, k, group, gen)
            t = {name: (None if v is None else v.cuda()) for name, v in lay.items() if name != "ints"}
            xq, scale, ssum = ops.quantize_act(h.make_x(m, k, gen).cuda(), with_sum=group == 0)
            ref = h._reference(lay, xq, scale, ssum)
            p = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
            for code in codes:
                nbytes = dev.gemm_dev_kernel_workspace(code, m, n, k, group)
                kind = code & 0xF
                ws = workspaces.get(kind)
                if ws is None or ws.numel() < nbytes:
                    ws = workspaces[kind] = torch.zeros(max(nbytes, 1 << 20), dtype=torch.uint8, device="cuda")
                out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                dev.gemm_dev_kernel(code, xq.data_ptr(), scale.data_ptr(), p(ssum), t["qweight"].data_ptr(),
                                    t["s1_scales"].data_ptr(), p(t["s1_szeros"]), p(t["s2_scales"]),
                                    p(t["s2_zeros"]), out.data_ptr(), m, n, k, group, ws.data_ptr(), ws.numel(),
                                    torch.cuda.current_stream().cuda_stream)
                assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (hex(code), m, n, k)
