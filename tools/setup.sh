#!/usr/bin/env bash
# Set up agecl on a fresh machine: a virtual environment in .venv with agecl and its
# dependencies (torch and torchvision from the package index; their Linux wheels run on CPU too).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Install from the package index alone: a machine-wide pip config may point at a local folder of
# CPU-only torch wheels that no torchvision build matches (`import torchvision` then fails).
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, nvidia.dali, numba, facenet_pytorch, webdataset; print(f'agecl environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {nvidia.dali.__version__}')"
