"""Build dcc's CUDA extensions with nvcc on first use and import them: csrc/w4a16 (module dcc_w4a16_ext, the
TinyChat W4A16 kernels), csrc/w4a8 (module dcc_w4a8_ext, the QServe W4A8 kernels) and csrc/w4a4 (dcc_w4a4_ext, the
Nunchaku W4A4 kernels); for sm_90 these three are compiled for sm_90a, since their Hopper kernels use wgmma.

The sources ship inside the installed package (dcc/_csrc/<name>, mapped from the repository's csrc/ by
pyproject.toml), so the runtime builds after `pip install` as well as from a checkout. Each module is compiled for the
visible GPU's architecture and cached in $DCC_CACHE/cuda/<key> (default ~/.cache/dcc/cuda/<key>), where the key hashes
the sources, the nvcc version, the architecture, the Python ABI and the flags; a later call with the same key imports
the cached module. Nothing here runs at install time, and nothing links against libtorch: the extension needs only
nvcc, the CUDA runtime headers and pybind11's headers. build_module / load_module build other modules the same way
(dev/cuda/dev_ext.py: the benchmark-only kernels, which are not installed)."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODULES = {"w4a16": "dcc_w4a16_ext", "w4a8": "dcc_w4a8_ext", "w4a4": "dcc_w4a4_ext",
           "attn": "dcc_attn_ext"}   # attn: the fast decoder's kernels (dcc/runtime/fastlm)
MODULE = MODULES["w4a16"]
HINT = "the CUDA runtime needs nvcc and a GPU; use --device cpu"
CXX_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-lineinfo"]


class CudaRuntimeUnavailable(RuntimeError):
    """nvcc, a GPU, pybind11 or Python's headers are missing, or the build failed; the message is one line."""


def _unavailable(why: str) -> CudaRuntimeUnavailable:
    return CudaRuntimeUnavailable(f"{HINT} ({why})")


def _check_name(name: str) -> str:
    if name not in MODULES:
        raise ValueError(f"unknown CUDA extension {name!r}: one of {', '.join(MODULES)}")
    return name


def source_roots() -> list[Path]:
    """Where the CUDA sources may be, in order: the installed package (dcc/_csrc, carried by the wheel), the checkout
    this module belongs to (csrc/ at the repository's top), then $DCC_CSRC."""
    here = Path(__file__).resolve()
    roots = [here.parents[2] / "_csrc", here.parents[3] / "csrc"]
    if os.environ.get("DCC_CSRC"):
        roots.append(Path(os.environ["DCC_CSRC"]))
    return roots


def source_dir(name: str = "w4a16") -> Path:
    """<root>/<name> of the first source root that has it (the checkout's csrc/<name> where none has)."""
    _check_name(name)
    roots = source_roots()
    return next((r / name for r in roots if (r / name).is_dir()), roots[1] / name)


def sources(name: str = "w4a16") -> list[Path]:
    d = source_dir(name)
    files = sorted(p for p in d.glob("*") if p.suffix in (".cu", ".cpp", ".cuh", ".h"))
    if not any(p.suffix in (".cu", ".cpp") for p in files):
        raise _unavailable(f"no CUDA sources in {d}")
    return files


def common_sources() -> list[Path]:
    """The headers every family includes as "../common/<name>" (csrc/common: PDL launches): part of each cache key."""
    roots = source_roots()
    d = next((r / "common" for r in roots if (r / "common").is_dir()), roots[1] / "common")
    return sorted(p for p in d.glob("*") if p.suffix in (".cuh", ".h"))


def find_nvcc() -> str:
    cands = []
    for var in ("DCC_NVCC",):
        if os.environ.get(var):
            cands.append(os.environ[var])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    which = shutil.which("nvcc")
    if which:
        cands.append(which)
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise _unavailable("nvcc not found: set CUDA_HOME or put nvcc on PATH")


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _unavailable(f"{nvcc} --version failed: {e}") from None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown"


def gpu_arch() -> str:
    """'90' for an H100: $DCC_CUDA_ARCH, else the current torch device's compute capability."""
    env = os.environ.get("DCC_CUDA_ARCH")
    if env:
        return env.replace("sm_", "").replace(".", "")
    try:
        import torch
    except ImportError:
        raise _unavailable("torch is not installed") from None
    if not torch.cuda.is_available():
        raise _unavailable("no CUDA GPU visible to torch")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise _unavailable(f"GPU compute capability {major}.{minor} < 8.0 (needs bf16 mma.sync)")
    return f"{major}{minor}"


def include_flags() -> list[str]:
    try:
        import pybind11
    except ImportError:
        raise _unavailable("pybind11 is not installed (pip install pybind11)") from None
    py_inc = sysconfig.get_paths()["include"]
    if not (Path(py_inc) / "Python.h").is_file():
        raise _unavailable(f"Python.h not found in {py_inc} (install the Python development headers)")
    return ["-I" + pybind11.get_include(), "-I" + py_inc]


def cache_root() -> Path:
    base = os.environ.get("DCC_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dcc") / "cuda"


def gencode(name: str, arch: str) -> list[str]:
    """nvcc -gencode flags: the GPU's own architecture; the W4A16, W4A8 and W4A4 modules on sm_90 target sm_90a
    (wgmma exists only there, and sm_90a code runs on every sm_90 GPU; their wgmma files compile to stubs for other
    targets)."""
    if _check_name(name) in ("w4a16", "w4a8", "w4a4") and arch == "90":
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_key(files: list[Path], nvcc_ver: str, arch: str, name: str = "w4a16", module: str | None = None) -> str:
    """Hash of the sources (folder, name and bytes of each), the toolchain, the flags and the module name."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.parent.name}/{p.name}".encode() + b"\0" + p.read_bytes() + b"\0")
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    h.update("|".join([nvcc_ver, arch, ext, sys.version, " ".join(CXX_FLAGS), module or MODULES[name],
                       " ".join(gencode(name, arch))]).encode())
    return h.hexdigest()[:20]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip()
        raise CudaRuntimeUnavailable(f"{HINT} (nvcc failed: {' '.join(cmd[:2])} ...)\n{msg}")


def build_module(module: str, files: list[Path], family: str, include_dirs: tuple[Path, ...] = (),
                 verbose: bool = False) -> Path:
    """Compile (if not cached) the .cu/.cpp files among `files` into the extension module `module` (its binding must
    say PYBIND11_MODULE(module, ...)), with the -gencode of `family` (w4a16 or w4a8) and -I for each of include_dirs;
    the headers among `files` only enter the cache key. Returns the module's path."""
    nvcc = find_nvcc()
    arch = gpu_arch()
    incs = include_flags() + ["-I" + str(d) for d in include_dirs]
    key = build_key(files, nvcc_version(nvcc), arch, family, module)
    out_dir = cache_root() / key
    target = out_dir / (module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    gencode_flags = gencode(family, arch)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        srcs = [p for p in files if p.suffix in (".cu", ".cpp")]
        objs = [Path(tmp) / f"{p.parent.name}_{p.name}.o" for p in srcs]
        cmds = [[nvcc, *CXX_FLAGS, *gencode_flags, *incs, "-c", str(s), "-o", str(o)] for s, o in zip(srcs, objs)]
        # a first build takes seconds to a minute: a verbose caller reports it at info level, others at debug (-v)
        logging.getLogger("dcc").log(logging.INFO if verbose else logging.DEBUG,
                                     f"building the CUDA module {module} for sm_{arch} into {out_dir}")
        with ThreadPoolExecutor(max_workers=min(len(cmds), os.cpu_count() or 1)) as pool:
            for f in [pool.submit(_run, c) for c in cmds]:
                f.result()
        tmp_target = Path(tmp) / target.name
        _run([nvcc, "-shared", *gencode_flags, "-Xcompiler", "-fPIC", *map(str, objs), "-o", str(tmp_target), "-ldl"])
        os.replace(tmp_target, target)  # atomic: concurrent builders end with one complete file
    return target


def build(verbose: bool = False, name: str = "w4a16") -> Path:
    """Compile (if not cached) and return the path of the extension module `name` (w4a16 or w4a8)."""
    return build_module(MODULES[_check_name(name)], sources(name) + common_sources(), name, verbose=verbose)


_LOADED: dict[str, object] = {}


def load_module(module: str, path_fn) -> object:
    """Import the extension module `module` from the path path_fn() returns (built on first use), once."""
    if module not in _LOADED:
        path = path_fn()
        spec = importlib.util.spec_from_file_location(module, path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ImportError as e:
            raise _unavailable(f"cannot import {path}: {e}") from None
        _LOADED[module] = mod
    return _LOADED[module]


def load(verbose: bool = False, name: str = "w4a16"):
    """The extension module `name` (w4a16 or w4a8), built on first use."""
    return load_module(MODULES[_check_name(name)], lambda: build(verbose=verbose, name=name))
