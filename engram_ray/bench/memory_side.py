"""A memory side as plain processes, for benchmarks without Ray: the shards (``engram-ray
shard``) and, optionally, the node's lookup agent (``python -m engram_ray.agent``), every
thread pinned to the given cores. They stop together when the benchmark leaves the ``with``
block, and with the benchmark itself if it is killed (each asks the kernel for SIGTERM when
its parent dies), so a killed run leaves nothing serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.layout import TableLayout

__all__ = ["PlainMemorySide", "plain_memory_side", "cpu_seconds"]

_PR_SET_PDEATHSIG = 1
#: How long the shards may take to load their rows and bind.
START_TIMEOUT_S = 120.0


@dataclass
class PlainMemorySide:
    """What :func:`plain_memory_side` started: the shards' addresses, the agent's socket (None
    without one), and the process ids by role (for CPU accounting)."""

    addresses: list[str]
    socket: str | None
    pids: dict[str, list[int]] = field(default_factory=dict)


def _child_setup(cores: set[int], parent: int) -> Callable[[], None]:
    """For ``preexec_fn``: pin the child to ``cores`` and have it get SIGTERM when this
    process dies (and exit now if it already has)."""
    def setup() -> None:
        os.sched_setaffinity(0, cores)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return setup


@contextlib.contextmanager
def plain_memory_side(preset: str, shards: int, cores: Iterable[int], resident_gib: float, *,
                      agent: bool = True, layout: TableLayout | None = None,
                      agent_cores: Iterable[int] | None = None) -> Iterator[PlainMemorySide]:
    """``shards`` shards of ``preset``'s table (``resident_gib`` of rows in RAM in all; a
    larger layout's rows map into them), with no auth and no optimiser, on ``cores``; and a
    lookup agent over them if ``agent`` (``layout``: the table's layout, which the agent
    needs), on ``agent_cores`` (default: ``cores``)."""
    from ..agent.process import spawn

    setup = _child_setup(set(cores), os.getpid())
    work = Path(tempfile.mkdtemp(prefix="engram-memory-side-"))
    procs: list[subprocess.Popen] = []
    try:
        ready = [work / f"ready-{i}" for i in range(shards)]
        for i in range(shards):
            cmd = [sys.executable, "-m", "engram_ray.cli", "shard", "--preset", preset, "--shards", str(shards),
                   "--index", str(i), "--no-auth", "--optimizer", "none", "--ready-file", str(ready[i]),
                   "--max-resident-gib", str(resident_gib)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=setup))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(r.exists() for r in ready):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"the shards did not come up (exit codes {[p.poll() for p in procs]})")
            time.sleep(0.1)
        side = PlainMemorySide([r.read_text().strip() for r in ready], None, {"shards": [p.pid for p in procs]})
        if agent:
            if layout is None:
                raise ValueError("plain_memory_side(agent=True) needs the table's layout")
            side.socket = str(work / "agent.sock")
            a = spawn(side.socket, side.addresses, layout,
                      preexec_fn=setup if agent_cores is None else _child_setup(set(agent_cores), os.getpid()))
            procs.append(a)
            side.pids["agent"] = [a.pid]
        yield side
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds every thread of ``pids`` has run so far (``/proc/<pid>/task/*/schedstat``,
    in ns: finer than the clock ticks of ``stat``); gone processes and threads count 0."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e9
