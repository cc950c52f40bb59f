#!/usr/bin/env bash
# Set up dcc and run the test suite (CPU). Tests that need ../shared/assets or the default model skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
export DCC_SMOLLM2_GGUF=${DCC_SMOLLM2_GGUF:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
python -m pytest tests -q "$@"
