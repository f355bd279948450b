#!/usr/bin/env bash
# Creates .venv (idempotent) and installs p2ch_luna with its dev, onnx, serve and dicom extras, plus its triton extra where it is used.
#
# torch: the versions the package metadata allows (setup.cfg), the newest CPU build (a "+cpu" version) that pip
# can see where this machine has no NVIDIA GPU, else pip's choice. P2CH_TORCH_SPEC chooses another build, e.g.
#   P2CH_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"   (CUDA 12.4)
#   P2CH_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"     (CPU only)
# Triton (the [triton] extra: --kernels triton on CUDA, and the kernels' tests in Triton's CPU interpreter) is
# installed on a CUDA machine (nvidia-smi there, or torch sees a GPU) or with P2CH_WITH_TRITON=1;
# P2CH_WITH_TRITON=0 never installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

cuda_machine() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && return 0
    .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

torch_requirement() {  # the torch line of install_requires in setup.cfg, e.g. "torch>=2.2"
    .venv/bin/python - <<'PY'
import configparser, re
config = configparser.ConfigParser()
config.read("setup.cfg")
lines = config["options"]["install_requires"].split("\n")
print(next(line.strip() for line in lines if re.match(r"\s*torch\b(?![-_\w])", line)))
PY
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${P2CH_TORCH_SPEC:-}" ]; then
        spec=$P2CH_TORCH_SPEC
    else
        spec=$(torch_requirement)
        if ! cuda_machine; then
            cpu_build=$(.venv/bin/pip index versions torch 2>/dev/null | sed -n 's/^Available versions: //p' \
                        | tr ', ' '\n\n' | grep '+cpu$' | sort -V | tail -n 1 || true)
            if [ -n "$cpu_build" ]; then spec="$spec,==$cpu_build"; fi
        fi
    fi
    echo "setup.sh: installing $spec"
    # shellcheck disable=SC2086
    .venv/bin/pip install --quiet $spec
fi
extras=dev,onnx,serve,dicom  # onnx: --runtime onnx, export; serve: the HTTP service; dicom: pydicom, --mask-format dicom-seg
case "${P2CH_WITH_TRITON:-auto}" in
    1) extras=$extras,triton ;;
    0) ;;
    *) if cuda_machine; then extras=$extras,triton; fi ;;
esac
.venv/bin/pip install --quiet -e ".[$extras]"
