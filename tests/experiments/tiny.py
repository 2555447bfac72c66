"""Run an experiment command on a tiny sweep (a 3-layer tiny MoE with 4 routed experts, Engram
in blocks 1 and 2, 3 steps of 2 x 32 tokens): what the end-to-end tests share."""

import subprocess
import sys

TINY = ["--model", "tiny", "--preset", "tiny", "--layers", "3", "--routed-experts", "4", "--engram-layers", "1",
        "2", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2"]


def run_tiny(command: str, *flags: str) -> subprocess.CompletedProcess:
    """``engram-ray <command> <tiny flags> <flags>`` (e.g. command "experiment iso"; later flags
    win); it must succeed."""
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", *command.split(), *TINY, *flags],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r
