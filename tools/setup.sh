#!/usr/bin/env bash
# Set up agecl on a fresh machine: a virtual environment in .venv with agecl and its
# dependencies (torch and torchvision from the package index; their Linux wheels run on CPU too).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch's Linux wheels bring ~3 GB of CUDA libraries: the environment takes ~7 GB once installed,
# and pip holds the downloaded wheels in its temporary folder while it installs them. Say so plainly
# up front rather than let pip fail half-way with "No space left on device".
NEED_GB=7
WANT_GB=11
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  free_kb() { df -Pk "$1" | awk 'NR==2 {print $4}'; }
  here_gb=$(( $(free_kb .) / 1048576 ))
  tmp_dir=${TMPDIR:-/tmp}
  [ -d "$tmp_dir" ] || tmp_dir=/tmp
  tmp_gb=$(( $(free_kb "$tmp_dir") / 1048576 ))
  if [ "$here_gb" -lt "$NEED_GB" ]; then
    echo "agecl setup: $here_gb GB free in $PWD, but the environment (.venv, with torch's CUDA" \
         "libraries) needs about $NEED_GB GB. Free some space and run this again." >&2
    exit 1
  fi
  if [ "$here_gb" -lt "$WANT_GB" ] || [ "$tmp_gb" -lt 4 ]; then
    echo "agecl setup: warning: $here_gb GB free here and $tmp_gb GB in $tmp_dir; installing needs" \
         "about $WANT_GB GB at its peak (~3 GB of downloaded wheels, then ~7 GB installed)." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Install from the package index alone: a machine-wide pip config may point at a local folder of
# CPU-only torch wheels that no torchvision build matches (`import torchvision` then fails).
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null
# No wheel cache: it would keep a second copy of the 3 GB download for good.
export PIP_NO_CACHE_DIR=1
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, nvidia.dali, numba, facenet_pytorch, webdataset; print(f'agecl environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {nvidia.dali.__version__}')"
