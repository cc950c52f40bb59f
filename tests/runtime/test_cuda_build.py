"""CPU-side checks of dcc.runtime.cuda.build (no GPU, no nvcc needed): which sources, module name and -gencode each
CUDA extension gets, and that the build cache key tells them apart."""
from __future__ import annotations

import importlib
import re

import pytest

build = importlib.import_module("dcc.runtime.cuda.build")   # the package re-exports a function named build


def test_gencode_per_module():
    assert build.gencode("w4a16", "90") == ["-gencode=arch=compute_90a,code=sm_90a"]  # its wgmma GEMM
    assert build.gencode("w4a16", "80") == ["-gencode=arch=compute_80,code=sm_80"]
    assert build.gencode("attn", "90") == ["-gencode=arch=compute_90,code=sm_90"]
    assert build.gencode("w4a8", "90") == ["-gencode=arch=compute_90a,code=sm_90a"]   # wgmma needs sm_90a
    assert build.gencode("w4a8", "80") == ["-gencode=arch=compute_80,code=sm_80"]
    assert build.gencode("w4a4", "90") == ["-gencode=arch=compute_90a,code=sm_90a"]   # its wgmma GEMM
    assert build.gencode("w4a4", "80") == ["-gencode=arch=compute_80,code=sm_80"]
    with pytest.raises(ValueError, match="unknown CUDA extension"):
        build.gencode("w2a2", "90")


@pytest.mark.parametrize("name", sorted(build.MODULES))
def test_sources_and_module_name(name):
    files = build.sources(name)
    assert all(p.parent == build.source_dir(name) for p in files)
    binding = [p for p in files if p.name == "bindings.cpp"]
    assert binding, f"csrc/{name} has no bindings.cpp"
    assert re.search(rf"PYBIND11_MODULE\({build.MODULES[name]},", binding[0].read_text())


def test_w4a8_sources_and_contract():
    names = {p.name for p in build.sources("w4a8")}
    assert {"w4a8.h", "gemm_wgmma.cu", "gemm_gemv.cu", "quant_act.cu", "bindings.cpp"} <= names
    header = (build.source_dir("w4a8") / "w4a8.h").read_text()
    for fn in ("quant_act", "gemm_mma", "gemm_mma_workspace", "gemm_wgmma", "gemm_wgmma_workspace",
               "gemm_wgmma_supported", "gemm_wgmma_preferred", "gemm_gemv_available"):
        assert re.search(rf"\b{fn}\(", header), fn


def test_w4a4_sources_and_contract():
    names = {p.name for p in build.sources("w4a4")}
    assert {"w4a4.h", "common.cuh", "quant_act.cu", "lora_down.cu", "gemm.cu", "gemm_wgmma.cu", "wgmma_kernel.cuh",
            "sm90_ptx.cuh", "bindings.cpp"} <= names
    assert build.MODULES["w4a4"] == "dcc_w4a4_ext"
    header = (build.source_dir("w4a4") / "w4a4.h").read_text()
    fns = ("quant_act", "quant_act_workspace", "lora_down", "gemm", "quant_act_nvfp4", "gemm_nvfp4", "gemm_wgmma",
           "gemm_wgmma_supported", "gemm_wgmma_tile")
    for fn in fns:
        assert re.search(rf"\b{fn}\(", header), fn
    binding = (build.source_dir("w4a4") / "bindings.cpp").read_text()
    for fn in fns:
        assert f'"{fn}"' in binding, fn


def test_build_key_separates_modules():
    k16 = build.build_key(build.sources("w4a16"), "nvcc 13", "90", "w4a16")
    k8 = build.build_key(build.sources("w4a8"), "nvcc 13", "90", "w4a8")
    assert k16 != k8 and k16 == build.build_key(build.sources("w4a16"), "nvcc 13", "90")
    assert build.build_key(build.sources("w4a4"), "nvcc 13", "90", "w4a4") not in (k16, k8)


@pytest.mark.parametrize("name", sorted(build.MODULES))
def test_common_headers_resolve_and_enter_the_key(name, monkeypatch):
    """Every '#include "../common/X"' of a family names a header of csrc/common, and build() hashes those headers:
    an edit there rebuilds each family that includes them."""
    common = {p.name: p for p in build.common_sources()}
    for p in build.sources(name):
        for inc in re.findall(r'#include "\.\./common/([^"]+)"', p.read_text()):
            assert inc in common, f"{p.name} includes ../common/{inc}, which csrc/common does not have"
    seen = {}
    monkeypatch.setattr(build, "build_module", lambda module, files, family, **kw: seen.setdefault("f", files))
    build.build(name=name)
    assert set(common.values()) <= set(seen["f"])


def test_w4a16_auto_path_by_m_and_width(monkeypatch):
    """path="auto": wgmma inside its M range; from M = 17 up to that range only for layers whose 128-channel tiles
    fill half the SMs (132 on an H100: N >= 8448); the fused kernel below, dequantise + cuBLAS above; wgmma nowhere
    it does not run, or with the range off."""
    from dcc.runtime.cuda import ops
    monkeypatch.setattr(ops, "WGMMA_M", (32, 256))
    monkeypatch.setattr(ops, "FUSED_MAX_M", 64)
    choose = ops.choose_path
    assert [choose(m, 4096, 132, True) for m in (1, 16, 17, 32, 33, 256, 257)] == \
        ["fused", "fused", "fused", "fused", "wgmma", "wgmma", "gemm"]
    assert [choose(m, 14336, 132, True) for m in (16, 17, 32, 33)] == ["fused", "wgmma", "wgmma", "wgmma"]
    assert choose(32, 8448, 132, True) == "wgmma" and choose(32, 8320, 132, True) == "fused"
    assert choose(32, 14336, 132, False) == "fused" and choose(100, 14336, 132, False) == "gemm"
    monkeypatch.setattr(ops, "WGMMA_M", (0, 0))   # DCC_W4A16_WGMMA=off
    assert choose(32, 14336, 132, True) == "fused" and choose(64, 14336, 132, True) == "fused"


def test_w4a16_wgmma_range_setting():
    """DCC_W4A16_WGMMA: 'LO:HI' (the M range path="auto" sends to the wgmma GEMM), 'off', or one clear error."""
    from dcc.runtime.cuda.ops import _wgmma_range

    assert _wgmma_range("32:256") == (32, 256)
    assert _wgmma_range("off") == _wgmma_range("0") == _wgmma_range("") == (0, 0)
    for bad in ("32", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="DCC_W4A16_WGMMA"):
            _wgmma_range(bad)
