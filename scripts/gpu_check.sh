#!/usr/bin/env bash
# The GPU check of issue 13 (see scripts/gpu_check.py for the steps): on a machine with a CUDA
# GPU, PyTorch, grpcio and protobuf but no Ray and no network, in at most 8 minutes, it runs
# every CUDA test, 20 training steps on CUDA through two `engram-ray shard` processes on
# loopback, and the serving bench on CUDA; JSON goes to results/gpu/ (summary.json, offload.json).
#
#   bash scripts/gpu_wheels.sh                  # here, once: the wheels that machine lacks
#   bash scripts/gpu_check.sh                   # there (the device tool: carry=[".gpu_wheels"])
#   bash scripts/gpu_check.sh --cpu-dry-run     # here: every step on CPU, tiny, Ray hidden
#
# Exit status 0 when every step passed. PYTHON picks the interpreter (default: python3 there,
# .venv/bin/python for the dry run); GPU_CHECK_BUDGET the seconds (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do [[ $a == --cpu-dry-run ]] && DRY=1; done
if (( DRY )); then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
BUDGET=${GPU_CHECK_BUDGET:-480}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/engram-gpu-check.XXXXXX")
PIDS=$WORK/shard.pids

# Whatever happens (a step hangs past the budget, Ctrl-C), the shards this check started stop.
stop_shards() {
    [[ -f $PIDS ]] || return 0
    while read -r pid; do kill -TERM "$pid" 2>/dev/null; done <"$PIDS"
    sleep 2
    while read -r pid; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null; done <"$PIDS"
}
cleanup() { stop_shards; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# The orchestrator keeps 15 s of the budget to stop the shards and write its summary itself;
# `timeout` is the backstop (TERM at the budget, KILL 10 s later).
timeout --kill-after=10 "$BUDGET" "$PY" scripts/gpu_check.py --work "$WORK" --pidfile "$PIDS" \
    --python "$PY" --budget "$BUDGET" "$@"
