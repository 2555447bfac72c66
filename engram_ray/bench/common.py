"""What every benchmark report carries: the machine, the software, and a timestamp."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on (absolute times mean nothing without it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib,
            "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform()}


def write_report(report: dict[str, Any], out: str | os.PathLike | None) -> None:
    report.setdefault("machine", machine_info())
    report.setdefault("time_utc", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
