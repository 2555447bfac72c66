"""A memory side as plain processes, for benchmarks without Ray: the shards (``engram-ray
shard``) and, optionally, the node's lookup agent (``python -m engram_ray.agent``), every
thread pinned to the given cores. They stop together when the benchmark leaves the ``with``
block, and with the benchmark itself if it is killed: each asks the kernel for SIGTERM when
the *thread* that started it ends (``PR_SET_PDEATHSIG``), so enter the block on a thread that
outlives it (the main thread, or the one that leaves it: a ``with`` block keeps its thread).
A killed benchmark leaves nothing serving (its temporary folder of sockets and layout stays).
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
from typing import TYPE_CHECKING, Any

from .isolation import proc_stat

if TYPE_CHECKING:
    from ..core.layout import TableLayout

__all__ = ["PlainMemorySide", "plain_memory_side", "cpu_snapshot", "cpu_seconds_between"]

_PR_SET_PDEATHSIG = 1
#: How long the shards may take to load their rows and bind, and the agent to listen.
START_TIMEOUT_S = 120.0


@dataclass
class PlainMemorySide:
    """What :func:`plain_memory_side` started: the shards' addresses, the agent's socket (None
    without one), and the processes by role (``pids`` for CPU accounting)."""

    addresses: list[str]
    socket: str | None
    procs: dict[str, list[subprocess.Popen]] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)  # pid -> its stderr

    @property
    def pids(self) -> dict[str, list[int]]:
        return {role: [p.pid for p in ps] for role, ps in self.procs.items()}

    def check(self) -> None:
        """Raise if a process of this memory side has exited (a figure measured meanwhile
        would be wrong, not merely slow), with the end of what it wrote to stderr."""
        for role, ps in self.procs.items():
            for p in ps:
                if _exited(p):
                    raise RuntimeError(f"a process of the memory side ({role}, pid {p.pid}) exited with code "
                                       f"{p.returncode}: {_tail(self.logs.get(p.pid))}")


def _exited(p: subprocess.Popen) -> bool:
    """Whether ``p`` has died. poll() alone can miss it for a while: a killed process whose
    threads are still exiting is a zombie that waitpid does not report yet."""
    if p.poll() is not None:
        return True
    fields = proc_stat(p.pid)
    if fields is not None and fields[0] not in ("Z", "X"):
        return False
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)  # its exit code, once its last thread is gone
    return True


def _tail(path: Path | None, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip() if path is not None else ""
    except OSError:
        text = ""
    if path is None:
        return "its stderr is this benchmark's"
    return text[-n:] or "nothing on its stderr"


def _child_setup(cores: set[int], parent: int) -> Callable[[], None]:
    """For ``preexec_fn``: pin the child to ``cores`` and have it get SIGTERM when its parent
    thread ends (and exit now if the parent is gone already). prctl is looked up here, in the
    parent: between fork and exec the child only makes system calls."""
    try:
        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal, cleaned up on exit alone
        prctl = None

    def setup() -> None:
        os.sched_setaffinity(0, cores)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return setup


def _wait_until(ready: Callable[[], bool], procs: list[subprocess.Popen], what: str, logs: dict[int, Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            why = "; ".join(f"pid {p.pid} exited with code {p.returncode}: {_tail(logs.get(p.pid))}" for p in dead)
            raise RuntimeError(f"{what} exited before coming up ({why})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def plain_memory_side(preset: str, shards: int, cores: Iterable[int], resident_gib: float, *,
                      agent: bool = True, layout: TableLayout | None = None,
                      agent_cores: Iterable[int] | None = None) -> Iterator[PlainMemorySide]:
    """``shards`` shards of ``preset``'s table (``resident_gib`` of rows in RAM in all; a
    larger layout's rows map into them), with no auth and no optimiser, on ``cores``; and a
    lookup agent over them if ``agent`` (``layout``: the table's layout, which the agent
    needs), on ``agent_cores`` (default: ``cores``). Yields once the shards serve and the
    agent listens."""
    from ..agent.process import spawn

    if agent and layout is None:
        raise ValueError("plain_memory_side(agent=True) needs the table's layout")
    setup = _child_setup(set(cores), os.getpid())
    work = Path(tempfile.mkdtemp(prefix="engram-memory-side-"))
    side = PlainMemorySide([], None)
    every: list[subprocess.Popen] = []
    try:
        ready = [work / f"ready-{i}" for i in range(shards)]
        for i in range(shards):
            cmd = [sys.executable, "-m", "engram_ray.cli", "shard", "--preset", preset, "--shards", str(shards),
                   "--index", str(i), "--no-auth", "--optimizer", "none", "--ready-file", str(ready[i]),
                   "--max-resident-gib", str(resident_gib)]
            with open(work / f"shard-{i}.err", "wb") as err:
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=setup)
            every.append(p)
            side.logs[p.pid] = work / f"shard-{i}.err"
        side.procs["shards"] = list(every)
        _wait_until(lambda: all(r.exists() for r in ready), every, "the shards", side.logs)
        side.addresses = [r.read_text().strip() for r in ready]
        if agent:
            assert layout is not None
            side.socket = str(work / "agent.sock")
            a = spawn(side.socket, side.addresses, layout,
                      preexec_fn=setup if agent_cores is None else _child_setup(set(agent_cores), os.getpid()))
            every.append(a)
            side.procs["agent"] = [a]
            socket = side.socket
            _wait_until(lambda: os.path.exists(socket), [a], "the lookup agent", side.logs)
        yield side
    finally:
        for p in every:
            p.terminate()
        try:
            for p in every:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)  # reaped: no zombie left behind
        finally:  # even if a second Ctrl-C cuts the waits short
            shutil.rmtree(work, ignore_errors=True)


def cpu_snapshot(pids: Iterable[int]) -> dict[tuple[int, int], int]:
    """Nanoseconds each thread of ``pids`` has run so far (``/proc/<pid>/task/*/schedstat``:
    finer than the clock ticks of ``stat``), for :func:`cpu_seconds_between`. A gone process
    raises: a figure without it would be wrong."""
    out: dict[tuple[int, int], int] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            raise RuntimeError(f"process {pid} is gone: its CPU time cannot be read") from None
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just ended
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(pid, int(tid))] = int(f.read().split()[0])
    return out


def cpu_seconds_between(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> float:
    """CPU seconds run between two snapshots: each thread in ``after`` from its figure in
    ``before`` (0 for one born since). A thread that ended between them is left out -- its
    last moments are lost, never its whole life subtracted."""
    return sum(ns - before.get(key, 0) for key, ns in after.items()) / 1e9
