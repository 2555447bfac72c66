"""What the model's thread pays per fetch through the lookup agent, measured:

    python -m engram_ray.agent.measure [--ids 2048] [--layers 2] [--iters 500] [--no-isolate]

A child process serves a table (in-process shards) and a :class:`LookupAgent`; this process is
the worker. Per fetch (one id array per layer) it times ``prefetch_unique_many`` (copy the
ids into slots + one send) and, after the rows have certainly arrived, each layer's
``result()`` (read its reply: a ``recv``), and reports medians and p90 in microseconds.
:func:`worker_cost` is the part a benchmark can reuse.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
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
    sleep between issue and wait stands for the compute the fetch hides behind."""
    issue, ready = [], []
    for i in range(iters + 20):
        t0 = time.perf_counter()
        fs = agent.prefetch_unique_many(layers)
        t1 = time.perf_counter()
        time.sleep(gap_s)
        t2 = time.perf_counter()
        for f in fs:
            f.result()
        t3 = time.perf_counter()
        for f in fs:
            f.release()
        if i >= 20:  # warm-up: slots created, caches filled
            issue.append(t1 - t0)
            ready.append(t3 - t2)
    iss, rdy = np.array(issue) * 1e6, np.array(ready) * 1e6
    tot = iss + rdy
    return {"layers": len(layers), "ids_per_layer": int(layers[0].size), "iters": iters,
            **{f"{k}_us": {"median": round(float(np.median(v)), 1), "p90": round(float(np.percentile(v, 90)), 1)}
               for k, v in (("issue", iss), ("ready", rdy), ("total", tot))}}


def _serve(preset: str, socket_path: str, shards: int, cores: set[int] | None) -> None:
    """Child: ``shards`` in-process shards of ``preset`` over a 50-id vocabulary and an agent,
    on ``cores`` (set before any thread starts, so every thread inherits it)."""
    if cores:
        os.sched_setaffinity(0, cores)
    from .. import config as C
    from ..client import EngramClient
    from ..core.layout import TableLayout
    from ..core.tokens import CompressedVocab
    from ..rpc import create_server
    from ..store import TableShard
    from .server import LookupAgent

    layout = TableLayout.build(C.preset(preset), CompressedVocab(np.arange(50)))
    servers = [create_server(TableShard.create(layout, shards, i), "127.0.0.1", 0) for i in range(shards)]
    client = EngramClient([f"127.0.0.1:{p}" for _, p in servers], layout)
    LookupAgent(client, socket_path).start()
    while os.getppid() != 1:  # until the parent (the measuring worker) is gone
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    from .. import config as C
    from ..core.layout import TableLayout
    from ..core.tokens import CompressedVocab

    ap = argparse.ArgumentParser(prog="python -m engram_ray.agent.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=2048, help="ids per fetch (default 2048: one layer of 8x32 tokens)")
    ap.add_argument("--layers", type=int, default=2, help="Engram layers per fetch (default 2)")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--no-isolate", action="store_true",
                    help="share every core (default with >= 2 cores: worker on the first, agent and shards on "
                         "the rest, as on a node where the agent runs beside the model on its own cores)")
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    isolate = len(cores) >= 2 and not args.no_isolate
    worker_cores, agent_cores = ({cores[0]}, set(cores[1:])) if isolate else (set(cores), None)
    layout = TableLayout.build(C.preset(args.preset), CompressedVocab(np.arange(50)))
    path = os.path.join(tempfile.mkdtemp(prefix="engram-measure-"), "agent.sock")
    child = mp.get_context("spawn").Process(target=_serve, args=(args.preset, path, args.shards, agent_cores),
                                          daemon=True)
    child.start()
    os.sched_setaffinity(0, worker_cores)
    try:
        agent = AgentClient(path, layout, start=lambda: None, connect_timeout=60)
        rng = np.random.default_rng(0)
        layers = [rng.integers(0, layout.total_rows, size=args.ids) for _ in range(args.layers)]
        out = worker_cost(agent, layers, args.iters)
        out["cores"] = {"worker": sorted(worker_cores), "agent": sorted(agent_cores or worker_cores)}
        print(json.dumps(out, indent=1))
        agent.close()
    finally:
        child.terminate()
        child.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
