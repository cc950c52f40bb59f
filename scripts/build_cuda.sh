#!/usr/bin/env bash
# Compile-check the CUDA sources in csrc/ for sm_80 and sm_90 (csrc/w4a16, w4a8 and w4a4 also for sm_90a, where their
# wgmma kernels live), and the benchmark-only kernels in dev/cuda/ the same way (against csrc/<family>'s headers): object files
# only, no GPU needed.
# Exits non-zero on a build error; prints a skip message and exits 0 when nvcc is absent.
#   NVCC=/path/to/nvcc  BUILD_DIR=build/cuda-check  VERBOSE=1 (ptxas register/spill report)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  for c in "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC=$c; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "build_cuda.sh: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
  exit 0
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${BUILD_DIR:-build/cuda-check}
mkdir -p "$OUT"

GENCODE=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
FLAGS=(-std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -Wall -Werror all-warnings)
[ "${VERBOSE:-0}" = 1 ] && FLAGS+=(-Xptxas -v)

PYBIND_INC=""
if PYBIND_INC=$("$PY" -m pybind11 --includes 2>/dev/null); then :; else PYBIND_INC=""; fi

echo "build_cuda.sh: $("$NVCC" --version | tail -n 1) -> $OUT (sm_80, sm_90; w4a16, w4a8, w4a4 also sm_90a)"
status=0
for src in csrc/*/*.cu csrc/*/*.cpp dev/cuda/*/*.cu dev/cuda/*/*.cpp; do
  [ -e "$src" ] || continue
  family=$(basename "$(dirname "$src")")
  extra=()
  prefix=""
  case "$src" in dev/*) extra=(-I "csrc/$family"); prefix="dev_" ;; esac
  if grep -q "pybind11" "$src"; then
    if [ -z "$PYBIND_INC" ]; then
      echo "  skip  $src (pybind11 not installed in $PY: pip install pybind11)"
      continue
    fi
    # shellcheck disable=SC2206
    extra+=($PYBIND_INC)
  fi
  gencode=("${GENCODE[@]}")
  case "$family" in w4a16|w4a8|w4a4) gencode+=(-gencode arch=compute_90a,code=sm_90a) ;; esac
  obj="$OUT/${prefix}${family}_$(basename "$src").o"
  if "$NVCC" "${FLAGS[@]}" "${gencode[@]}" "${extra[@]}" -c "$src" -o "$obj"; then
    echo "  ok    $src"
  else
    echo "  FAIL  $src"
    status=1
  fi
done
if [ "$status" -ne 0 ]; then
  echo "build_cuda.sh: CUDA build failed"
  exit 1
fi
echo "build_cuda.sh: all CUDA sources compiled"
