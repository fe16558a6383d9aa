#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: the CPU torch wheel first (so nothing pulls a CUDA
# build), then this package with everything the tests and the stress suite import (the hf,
# stress and dev extras; dev includes Triton, run through its interpreter on the CPU), without
# build isolation (so the installed torch is used and no second torch is pulled).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
# --no-build-isolation builds with what is installed: the build backend must be there.
python -m pip install -q "setuptools>=64" wheel
# The installed torch is pinned by a constraints file: an extra that asked for another torch
# makes pip fail here instead of replacing the CPU build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
python -m pip install -q --no-build-isolation -e ".[hf,stress,dev]" -c "$constraints"
