#!/usr/bin/env bash
# The GPU side of CI: build every CUDA extension family at once (each family's files compile in parallel too; the
# modules land in $DCC_CACHE), then run each family's GPU tests under a time limit, one summary line a family. Run on
# a machine with a CUDA GPU, nvcc and dcc importable (the README's setup, or PYTHONPATH=. with the requirements).
#   FAMILIES="attn w4a16 w4a8 w4a4"  LIMIT=300 (seconds a family's tests)  PYTEST="python3 -m pytest"
# Exits 0 when every family built and its tests passed, 1 when one failed or ran out of time, 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
FAMILIES=${FAMILIES:-attn w4a16 w4a8 w4a4}
LIMIT=${LIMIT:-300}
PYTEST=${PYTEST:-$PY -m pytest}
export HF_HUB_OFFLINE=1

tests_of() {
  case "$1" in
    attn) echo tests/runtime/test_cuda_attn.py tests/runtime/test_cuda_pdl.py tests/runtime/test_fastlm_cuda.py ;;
    w4a16) echo tests/runtime/test_cuda_w4a16.py tests/runtime/test_cuda_w4a16_wgmma.py \
                tests/runtime/test_cuda_w4a16_norm.py ;;
    w4a8) echo tests/runtime/test_cuda_w4a8.py tests/runtime/test_qserve_fused_cuda.py ;;
    w4a4) echo tests/runtime/test_cuda_w4a4.py tests/runtime/test_cuda_w4a4_quant_fused.py \
               tests/runtime/test_cuda_w4a4_wgmma.py ;;
    *) echo "gpu_check.sh: unknown family $1 (attn, w4a16, w4a8, w4a4)" >&2; return 1 ;;
  esac
}

for f in $FAMILIES; do
  tests_of "$f" > /dev/null || exit 2
done
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU visible to torch ($PY); nothing to check" >&2
  exit 2
fi

LOGS=$(mktemp -d)
t0=$(date +%s)
for f in $FAMILIES; do
  ( $PY -c "from dcc.runtime.cuda.build import load; load(name='$f')" > "$LOGS/build_$f.log" 2>&1
    echo $? > "$LOGS/build_$f.rc" ) &
done
wait
status=0
for f in $FAMILIES; do
  if [ "$(cat "$LOGS/build_$f.rc")" != 0 ]; then
    echo "FAIL  $f: build ($(tail -n 1 "$LOGS/build_$f.log"))"
    status=1
    continue
  fi
  s=$(date +%s)
  # shellcheck disable=SC2046
  timeout "$LIMIT" $PYTEST $(tests_of "$f") -q -p no:cacheprovider > "$LOGS/test_$f.log" 2>&1
  rc=$?
  summary=$(grep -E "passed|failed|error" "$LOGS/test_$f.log" | tail -n 1)
  if [ $rc = 0 ]; then
    echo "ok    $f: $summary ($(( $(date +%s) - s )) s)"
  else
    [ $rc = 124 ] && summary="ran past ${LIMIT} s"
    echo "FAIL  $f: $summary (log: $LOGS/test_$f.log)"
    status=1
  fi
done
echo "gpu_check.sh: $(( $(date +%s) - t0 )) s; logs in $LOGS"
exit $status
