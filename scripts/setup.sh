#!/usr/bin/env bash
# Creates .venv (idempotent) and installs p2ch_luna with its dev extra (and Triton on Linux x86-64).
# torch is installed first as the CPU build where one is available; set
# P2CH_TORCH_SPEC (e.g. "torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124")
# to choose a CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/pip install --quiet ${P2CH_TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/pip install --quiet -e '.[dev]'
# Triton: the classifier's small-convolution kernels on CUDA, and their tests on the CPU (in Triton's
# interpreter). CUDA builds of torch bring their own; the CPU build does not.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
    .venv/bin/pip install --quiet "triton>=3.6"
fi
