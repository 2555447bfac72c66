"""``engram-ray bench agent-hop``: what the lookup agent adds to a lookup's round trip.

A worker can reach the shards with an :class:`~engram_ray.client.EngramClient` in its own
process or through the node's lookup agent (ids and rows through shared memory; the agent
owns the client). The agent keeps gRPC and asyncio off the model's thread, at the price of one
more hop. This benchmark times both round trips -- ``prefetch_unique(ids)`` to ``result()`` --
against the same shards, interleaved, for several lookup sizes.

Processes, all plain (no Ray): the shards (``engram-ray shard``) and the agent run pinned to
the memory cores; the measuring worker to the first core. ``agent_cores="worker"`` puts the
agent on the worker's core instead (the worker blocks while it waits, so the agent then has a
core of its own: the layout of a compute node whose memory side lives elsewhere). The JSON
records which process had which cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.layout import TableLayout

__all__ = ["run"]


def _round_trip(source: Any, ids: np.ndarray) -> float:
    t0 = time.perf_counter()
    f = source.prefetch_unique(ids)
    f.result()
    dt = time.perf_counter() - t0
    release = getattr(f, "release", None)
    if release is not None:
        release()
    return dt


def _interleaved(layout: TableLayout, addresses: list[str], sock: str | None, sizes: Sequence[int], calls: int,
                 progress: bool) -> list[dict[str, Any]]:
    """Round trips through an in-process client and through the agent at ``sock``, one of
    each per call, for each size (10 warm-ups each)."""
    from ..agent import AgentClient
    from ..client import EngramClient

    assert sock is not None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sizes) * calls, desc="bench agent-hop", unit="call")
    results = []
    # start=no-op: no agent spawned from here; connecting retries while ours comes up
    agent = AgentClient(sock, layout, start=lambda: None, connect_timeout=120)
    with EngramClient(addresses, layout) as client, agent:
        rng = np.random.default_rng(0)
        for n in sizes:
            lat: dict[str, list[float]] = {"client": [], "agent": []}
            for i in range(calls + 10):  # 10 warm-ups (slots, channels)
                ids = rng.integers(0, layout.total_rows, size=n)
                for name, src in (("client", client), ("agent", agent)):
                    dt = _round_trip(src, ids)
                    if i >= 10:
                        lat[name].append(dt)
                if bar is not None and i >= 10:
                    bar.update(1)
            med = {k: 1e3 * float(np.median(v)) for k, v in lat.items()}
            results.append({"ids": n, **{f"{k}_{q}_ms": 1e3 * float(np.percentile(v, p))
                                         for k, v in lat.items() for q, p in (("p50", 50), ("p90", 90))},
                            "agent_extra_ms": med["agent"] - med["client"]})
    if bar is not None:
        bar.close()
    return results


def run(layout: TableLayout, preset: str, *, sizes: Sequence[int] = (128, 2048, 16384), shards: int = 2,
        calls: int = 200, agent_cores: str = "memory", max_resident_gib: float = 1.0,
        progress: bool = False) -> dict[str, Any]:
    """Interleaved round trips (client in-process, then agent, per call) for each size; p50/p90
    per path and the agent's extra milliseconds at the median. The shards keep at most
    ``max_resident_gib`` of rows in RAM (a 100B layout's rows map into them, as in bench offload)."""
    from .memory_side import plain_memory_side

    if agent_cores not in ("memory", "worker"):
        raise ValueError(f"agent_cores={agent_cores!r}: expected 'memory' or 'worker'")
    cores = sorted(os.sched_getaffinity(0))
    worker = {cores[0]}
    memory = set(cores[1:]) or worker
    agent_set = memory if agent_cores == "memory" else worker
    original = set(cores)
    try:
        with plain_memory_side(preset, shards, memory, max_resident_gib, layout=layout,
                               agent_cores=agent_set) as side:
            os.sched_setaffinity(0, worker)  # the client's I/O thread is born here, on the worker's core
            results = _interleaved(layout, side.addresses, side.socket, sizes, calls, progress)
    finally:
        os.sched_setaffinity(0, original)
    return {"benchmark": "agent-hop", "preset": preset, "shards": shards, "calls_per_size": calls,
            "max_resident_gib": max_resident_gib,
            "cores": {"worker (and its client's I/O thread)": sorted(worker), "shards": sorted(memory),
                      "agent": sorted(agent_set)},
            "results": results, "statistic": "median and p90 of round trips, client and agent interleaved"}
