"""Core isolation for ``engram-ray bench offload``: the model computes on its own cores.

Why: on a shared machine the memory side (shard servers, the client's I/O thread, gRPC's
threads, Ray's own processes) takes CPU from the forward pass, and the benchmark would charge
that to the remote table. A serving deployment keeps them apart; so does the benchmark.

How (Linux semantics: ``sched_setaffinity(tid)`` sets one thread; a new thread or process
inherits its creator's set):

1. :meth:`Isolation.memory_side` pins every thread of this process to the *memory* cores, so
   what starts afterwards -- ``ray.init``'s processes (and the workers and shard actors the
   raylet forks), the client's I/O thread, gRPC's threads -- inherits them.
2. :meth:`Isolation.run_model` runs the model's work on a new thread that first pins itself
   to the *compute* cores and sets torch's thread count to match, before any torch op: the
   OpenMP team that torch's intra-op parallelism uses is per calling thread and is created by
   its first parallel op, so the model thread's team is born on the compute cores.
3. :meth:`Isolation.record` reads ``Cpus_allowed_list`` of every thread of this process and of
   every descendant process from ``/proc`` (what the kernel enforces, not what we asked for).

The in-process baseline (no Engram, local table) runs on the same model thread: same cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Isolation", "parse_cpulist", "cpus_allowed", "process_cpus", "pin_process", "descendants", "smt_siblings",
           "cores_busy_s"]

T = TypeVar("T")


def parse_cpulist(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]`` (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if part:
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b or a) + 1))
    return out


def cores_busy_s(cores: Iterable[int], stat: str = "/proc/stat") -> float | None:
    """Seconds ``cores`` have spent busy since boot (user, nice, system, irq and softirq time
    in /proc/stat, every process together; not idle, iowait nor steal), at the kernel's tick
    (10 ms). None where /proc/stat cannot be read or lacks one of the cores. Read before and
    after a run, it is what the run cost those cores, whoever spent it."""
    want = {f"cpu{c}" for c in cores}
    busy, seen = 0, 0
    try:
        with open(stat) as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in want:
                    v = [int(x) for x in rest.split()]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6]
                    seen += 1
    except (OSError, ValueError, IndexError):
        return None
    return busy / os.sysconf("SC_CLK_TCK") if seen == len(want) else None


def cpus_allowed(pid: int, tid: int | None = None) -> list[int]:
    """The cores a process (its main thread) or one of its threads may run on, from /proc."""
    path = Path(f"/proc/{pid}") / (f"task/{tid}" if tid is not None else "") / "status"
    for line in path.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1])
    raise RuntimeError(f"{path}: no Cpus_allowed_list")


def proc_stat(pid: int, tid: int | None = None) -> list[str] | None:
    """The fields of ``/proc/<pid>[/task/<tid>]/stat`` after the name (the state first, then
    the parent's pid, ...; the name may hold spaces and ')'), or None if it is gone."""
    path = Path(f"/proc/{pid}") / (f"task/{tid}" if tid is not None else "") / "stat"
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def _comm(pid: int, tid: int | None = None) -> str:
    path = Path(f"/proc/{pid}") / (f"task/{tid}" if tid is not None else "") / "comm"
    try:
        return path.read_text().strip()
    except OSError:
        return "?"


def pin_process(pid: int, cores: Iterable[int]) -> int:
    """Pin every thread of ``pid`` (``taskset -a``); returns threads pinned. Threads that exit
    meanwhile or belong to another user are skipped."""
    n, cores = 0, set(cores)
    for tid in _tids(pid):
        try:
            os.sched_setaffinity(tid, cores)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs, ...), from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        fields = proc_stat(int(d)) if d.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return sorted(out)


def smt_siblings(cores: Iterable[int]) -> dict[int, list[int]]:
    """Each core's hardware threads on the same physical core (itself included), from
    /sys/devices/system/cpu/cpuN/topology/thread_siblings_list; a core whose topology cannot be
    read is its own. Two sides on siblings share one core's pipelines and caches: the memory
    side's work would then slow the model's."""
    out = {}
    for c in cores:
        try:
            text = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
            out[c] = sorted(set(parse_cpulist(text)) | {c})
        except (OSError, ValueError):
            out[c] = [c]
    return out


def _physical_cores(avail: list[int], siblings: dict[int, list[int]]) -> list[list[int]]:
    """``avail`` grouped into physical cores: cores linked by ``siblings`` (either way, or
    through another) are one group; siblings outside ``avail`` are ignored."""
    parent = {c: c for c in avail}

    def root(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for c in avail:
        for s in siblings.get(c, [c]):
            if s in parent:
                parent[root(s)] = root(c)
    groups: dict[int, list[int]] = {}
    for c in avail:
        groups.setdefault(root(c), []).append(c)
    return list(groups.values())


class Isolation:
    """Compute cores for the model, memory cores for everything else; or, disabled, one shared
    set (today's behaviour: nothing pinned, the model runs on the calling thread)."""

    def __init__(self, compute: list[int], memory: list[int], enabled: bool = True):
        self.compute, self.memory, self.enabled = sorted(compute), sorted(memory), enabled
        #: What this process had before: :meth:`restore` puts it back.
        self.original = sorted(os.sched_getaffinity(0))
        #: The model thread's id, once :meth:`run_model` started it.
        self.model_tid: int | None = None

    @classmethod
    def split(cls, enabled: bool = True, memory_cores: int | None = None,
              siblings: dict[int, list[int]] | None = None) -> Isolation:
        """Split the cores this process may use: about ``memory_cores`` (default: a quarter, at
        least one) for the memory side, the rest for compute. Whole physical cores go to one
        side (``siblings``: read from sysfs by default; cores that name each other, directly or
        not, are one core), taken from the highest-numbered, so the two sides never share a
        core's hardware threads. The memory side may get up to a core's threads minus one more
        than asked, but never more than compute. Where that leaves it nothing (one physical
        core), the split is by hardware thread. With fewer than two cores, or
        ``enabled=False``, nothing is split."""
        avail = sorted(os.sched_getaffinity(0))
        if not enabled or len(avail) < 2:
            return cls(avail, avail, enabled=False)
        k = min(max(1, memory_cores or len(avail) // 4), len(avail) - 1)
        groups = _physical_cores(avail, siblings if siblings is not None else smt_siblings(avail))
        memory: list[int] = []
        for g in sorted(groups, key=max, reverse=True):
            if len(memory) >= k:
                break
            if 2 * (len(memory) + len(g)) <= len(avail):  # memory never outgrows compute
                memory += g
        if not memory:  # one physical core, or only cores wider than half: split the threads
            return cls(avail[:-k], avail[-k:])
        return cls(sorted(set(avail) - set(memory)), sorted(memory))

    def memory_side(self) -> None:
        """Pin this whole process to the memory cores: what it starts from now on inherits
        them (Ray's processes, the client's I/O thread, gRPC's threads)."""
        if self.enabled:
            pin_process(os.getpid(), self.memory)

    def restore(self) -> None:
        """Give every thread of this process its cores from before :meth:`memory_side` (a
        caller that goes on -- a test session -- must not stay on the memory cores)."""
        if self.enabled:
            pin_process(os.getpid(), self.original)

    def pin_children(self) -> int:
        """Pin every descendant process (every thread) to the memory cores, in case one was
        started before :meth:`memory_side`; returns processes pinned."""
        if not self.enabled:
            return 0
        kids = descendants(os.getpid())
        for pid in kids:
            pin_process(pid, self.memory)
        return len(kids)

    def run_model(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread pinned to the compute cores, torch's thread count set to match
        before its first op (disabled: on this thread, as it is)."""
        if not self.enabled:
            self.model_tid = threading.get_native_id()
            return fn()
        box: dict[str, Any] = {}

        def body() -> None:
            os.sched_setaffinity(0, self.compute)  # this thread; its OpenMP team inherits it
            import torch
            torch.set_num_threads(len(self.compute))
            self.model_tid = threading.get_native_id()
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                box["error"] = e

        t = threading.Thread(target=body, name="engram-bench-model")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _side(self, cpus: list[int]) -> str:
        s = set(cpus)
        if not self.enabled:
            return "shared"
        return "compute" if s <= set(self.compute) else "memory" if s <= set(self.memory) else "both"

    def record(self) -> dict[str, Any]:
        """Which cores each side had, read back from /proc: every thread of this process
        (Python threads by name), every descendant process (raylet, gcs, shard actors, ...)
        with the union of its threads' cores; ``ok`` when the model thread is on the compute
        cores and every other Python thread and every descendant on the memory cores."""
        me = os.getpid()
        names = {t.native_id: t.name for t in threading.enumerate()}
        threads = []
        for tid in _tids(me):
            try:
                cpus = cpus_allowed(me, tid)
            except OSError:
                continue
            threads.append({"tid": tid, "name": names.get(tid, _comm(me, tid)), "python": tid in names,
                            "cpus": cpus, "side": self._side(cpus)})
        procs = []
        for pid in descendants(me):
            cpus = process_cpus(pid)
            procs.append({"pid": pid, "name": _comm(pid), "threads": len(_tids(pid)), "cpus": cpus,
                          "side": self._side(cpus)})
        model = [t for t in threads if t["tid"] == self.model_tid]
        others = [t for t in threads if t["python"] and t["tid"] != self.model_tid]
        ok = (not self.enabled) or (bool(model) and model[0]["side"] == "compute"
                                    and all(t["side"] == "memory" for t in others + procs))
        sib = smt_siblings(self.compute)
        shared = sorted([c, m] for c in self.compute for m in sib[c] if m != c and m in self.memory)
        return {"enabled": self.enabled, "compute_cores": self.compute, "memory_cores": self.memory,
                "smt_shared": shared if self.enabled else [], "ok": ok, "model_thread": model[0] if model else None,
                "threads": threads, "processes": procs,
                "sides": {s: sum(1 for t in threads if t["side"] == s) for s in ("compute", "memory", "both")}}


def process_cpus(pid: int) -> list[int]:
    """The union of the cores every thread of ``pid`` may run on, from /proc (threads that exit
    meanwhile are skipped)."""
    return sorted({c for tid in _tids(pid) for c in _safe_cpus(pid, tid)})


def _safe_cpus(pid: int, tid: int) -> list[int]:
    try:
        return cpus_allowed(pid, tid)
    except OSError:  # the thread exited between listing and reading
        return []
