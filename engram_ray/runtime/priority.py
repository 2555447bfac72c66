"""Serving actors run at the node's normal CPU priority, not at Ray's worker niceness.

Ray starts every worker process at nice 15 (``RAY_worker_niceness``), so that busy tasks never
starve its own daemons. A shard or a lookup agent is the opposite case: it sleeps until a
lookup arrives and then sits on a model's critical path, while raylet, the GCS, the dashboard
and the log monitor run at nice 0 on the same cores. By the scheduler's weights (36 at nice 15
against 1024 at 0) it then gets ~3 % of a core whenever a daemon wants that core, so a lookup
that lands while one does its periodic work waits for it. (On this project's idle 2-core CI
box the change moved no lookup latency measurably; it is for nodes whose daemons are busy.)
The trade-off Ray's default guards against: a shard serving flat out at nice 0 competes with
raylet and the GCS as an equal, where at 15 it would yield to them.

Raising priority back to 0 needs CAP_SYS_NICE or an RLIMIT_NICE of 20; where neither is
granted the actor keeps Ray's niceness and says so in its log (start Ray with
``RAY_worker_niceness=0`` in its environment to serve at 0 without either).
"""

from __future__ import annotations

import logging
import os

__all__ = ["NORMAL_NICE", "serve_at_normal_priority", "niceness"]

log = logging.getLogger(__name__)

#: The niceness a serving actor asks for: the default of every process Ray does not start.
NORMAL_NICE = 0


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        return [0]


def niceness() -> int:
    """This thread's niceness (Linux: per thread; new threads inherit their creator's)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def serve_at_normal_priority(nice: int = NORMAL_NICE) -> int:
    """Set every thread of this process (and so every thread it starts later) to ``nice``
    where allowed; returns the calling thread's niceness afterwards. Call it before the
    actor starts its servers, so their threads are born at that priority."""
    before = niceness()
    if before <= nice:
        return before
    done: set[int] = set()
    denied = 0
    while True:  # again until no new thread shows up: one born meanwhile inherits its creator's
        todo = [t for t in _threads() if t not in done]
        if not todo:
            break
        for tid in todo:
            done.add(tid)
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
            except PermissionError:
                denied += 1
    after = niceness()
    if denied:
        log.warning("%d of this serving process's threads stay at Ray's worker niceness (this one: %d): "
                    "lowering it to %d needs CAP_SYS_NICE or RLIMIT_NICE >= %d; lookups may wait behind "
                    "Ray's daemons. Start Ray with RAY_worker_niceness=%d to avoid it",
                    denied, after, nice, 20 - nice, nice)
    return after
