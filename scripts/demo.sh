#!/usr/bin/env bash
# The main job on the embedded default model: SmolLM2-135M-Instruct -> TinyChat W4A16 (AWQ, group 64), then
# inspect, validate and measure perplexity of the artifact itself. Data come from ../shared/assets unless
# CALIB / EVAL point elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ASSETS=${ASSETS:-../shared/assets}
CALIB=${CALIB:-$ASSETS/ptb/ptb.valid.txt}
EVAL=${EVAL:-$ASSETS/wikitext2_raw_test/wiki.test.raw}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-out/smollm2-w4g64-awq}
for f in "$CALIB" "$EVAL"; do
  [ -f "$f" ] || { echo "demo: $f not found; set CALIB=... and EVAL=... to text files" >&2; exit 2; }
done
# 576-wide layers cannot take TinyChat's group 128; group 64 is dcc's layout for them (dcc runtime only)
dcc compile "$MODEL" --target tinychat --algo awq --group-size 64 --calib "$CALIB" -o "$OUT" --force \
  --dump-dir "$OUT.dumps"
dcc inspect "$OUT" | tail -n 12
dcc validate "$OUT" --model "$MODEL"  | tail -n 4
dcc eval "$OUT" --ppl "$EVAL" --windows 8 --seq-len 512 --baseline "$MODEL"
