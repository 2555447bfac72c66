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
echo "setup: ready ($VENV)"
