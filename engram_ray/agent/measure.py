"""What the model's thread pays per fetch through the lookup agent, measured
(``engram-ray agent-measure`` runs it against a table and an agent in a child process):

    engram-ray agent-measure [--ids 2048] [--layers 2] [--iters 500] [--no-isolate]

Per fetch (one id array per layer) :func:`worker_cost` times ``prefetch_unique_many`` (copy the
ids into slots + one send) and, after a gap that stands for compute, the thread's CPU time in
each layer's ``result()`` (read its reply: a ``recv``), and reports medians and p90 in
microseconds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .client import AgentClient

__all__ = ["worker_cost"]


def worker_cost(agent: AgentClient, layers: list[np.ndarray], iters: int = 500, gap_s: float = 0.002
                ) -> dict[str, Any]:
    """Per fetch of one id array per layer: ``issue_us`` (``prefetch_unique_many``: the ids into
    slots, one packet), ``ready_us`` (every layer's ``result()`` once the rows are in: reading
    the replies), ``total_us`` (both), as medians and p90 over ``iters`` fetches; ``gap_s`` of
    sleep between issue and wait stands for the compute the fetch hides behind, and
    ``in_by_gap`` is the share of fetches whose rows were all in by then. Reading is timed as
    the thread's CPU time (``time.thread_time``), so rows still travelling after the gap cost
    what they cost the model thread -- a blocking ``recv`` and the read -- and never the wire's
    time (on the H200's VM a 2 x 512-id lookup took ~2 ms, which wall time counted as reading)."""
    issue, ready, in_time = [], [], []
    for i in range(iters + 20):
        t0 = time.perf_counter()
        fs = agent.prefetch_unique_many(layers)
        t1 = time.perf_counter()
        time.sleep(gap_s)
        c2 = time.thread_time()
        landed = all(f.done() for f in fs)  # reads the replies that are in
        for f in fs:
            f.result()
        c3 = time.thread_time()
        for f in fs:
            f.release()
        if i >= 20:  # warm-up: slots created, caches filled
            issue.append(t1 - t0)
            ready.append(c3 - c2)
            in_time.append(landed)
    iss, rdy = np.array(issue) * 1e6, np.array(ready) * 1e6
    tot = iss + rdy
    return {"layers": len(layers), "ids_per_layer": int(layers[0].size), "iters": iters, "gap_s": gap_s,
            "in_by_gap": round(float(np.mean(in_time)), 3),
            **{f"{k}_us": {"median": round(float(np.median(v)), 1), "p90": round(float(np.percentile(v, 90)), 1)}
               for k, v in (("issue", iss), ("ready", rdy), ("total", tot))}}
