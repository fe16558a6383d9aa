#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: the CPU torch wheel first (so nothing pulls a CUDA
# build), then this package with its test and Hugging Face extras, without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q --no-build-isolation -e ".[hf,stress,dev]"
