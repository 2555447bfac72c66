"""Whether an actor's process has exited, asked on the node it ran on.

``os.kill(pid, 0)`` only sees the processes of the machine it runs on: from a driver on the
head node it would call a memory node's shard "gone" at once (no such pid here), or "alive"
for as long as an unrelated local process has that pid. So the question goes to the node
itself: answered in place when it is this process's node, else by a zero-CPU task pinned to
that node.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["probe_on_node", "wait_gone"]

#: Seconds allowed on top of ``timeout`` for the probe task to be scheduled and started.
PROBE_START_S = 60.0


def _gone_within(pid: int, timeout: float) -> bool:
    """On this node: True once no process of ours has ``pid``, False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            # EPERM: a process has this pid but runs as another user -- a shard started under
            # its own uid (a container runtime_env) is exactly that, so it counts as alive.
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


_gone_remote = ray.remote(_gone_within)


def probe_on_node(node_id: str, pid: int, timeout: float) -> bool:
    """:func:`_gone_within` run by a task pinned to node ``node_id``. A node that is gone took
    the process with it (True)."""
    probe = _gone_remote.options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    ref = probe.remote(pid, timeout)
    try:
        return bool(ray.get(ref, timeout=timeout + PROBE_START_S))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return False
    except ray.exceptions.RayError:
        if not _node_alive(node_id):
            return True
        raise


def wait_gone(node_id: str, pid: int, timeout: float) -> bool:
    """True once the process ``pid`` of node ``node_id`` has exited, False if it is still
    there after ``timeout`` seconds (a remote check may take up to ``PROBE_START_S`` more to
    start)."""
    # Under Ray Client (ray://) this process is not on the node Ray names as ours: always ask
    # the node.
    local = not ray.util.client.ray.is_connected()
    if local and node_id == ray.get_runtime_context().get_node_id():
        return _gone_within(pid, timeout)
    return probe_on_node(node_id, pid, timeout)
