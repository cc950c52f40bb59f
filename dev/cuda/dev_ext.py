"""Build and import the benchmark-only CUDA modules, dcc_w4a16_dev and dcc_w4a8_dev, through dcc's own build
machinery (dcc/runtime/cuda/build.py: same flags, -gencode and cache): the product's sources of the family
(csrc/<family>, less its bindings.cpp) plus dev/cuda/<family>, whose bindings.cpp names the dev module. They are never
installed; bench/gpu_w4a16.py --variants, bench/gpu_w4a8.py --sweep and dev/cuda/*/test_variants.py load them.

    import sys; sys.path.insert(0, "dev/cuda"); import dev_ext
    ext = dev_ext.load("w4a16")          # ext.gemv_variant_names(), ext.gemv_variant(...)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

DEV = Path(__file__).resolve().parent
sys.path.insert(0, str(DEV.parents[1]))   # the checkout, for dcc itself

build = importlib.import_module("dcc.runtime.cuda.build")   # the package re-exports a function named build

# Product sources the dev kernels do not link against: its binding (the dev module has its own), and for w4a8 the
# wgmma GEMM and the activation quantization (the slowest sm_90a builds; the tests quantize with the product module).
SKIP = {"w4a16": {"bindings.cpp"}, "w4a8": {"bindings.cpp", "gemm_wgmma.cu", "quant_act.cu"}}
MODULES = {"w4a16": "dcc_w4a16_dev", "w4a8": "dcc_w4a8_dev"}


def sources(family: str) -> list:
    product = [p for p in build.sources(family) if p.name not in SKIP[family]]
    dev = sorted(p for p in (DEV / family).glob("*") if p.suffix in (".cu", ".cpp", ".cuh", ".h"))
    return product + build.common_sources() + dev


def load(family: str, verbose: bool = False):
    """The dev module of `family` (w4a16 or w4a8), built on first use (minutes for w4a8 on few cores)."""
    files = sources(family)
    incs = (build.source_dir(family), DEV / family)
    return build.load_module(MODULES[family], lambda: build.build_module(MODULES[family], files, family, incs,
                                                                         verbose=verbose))
