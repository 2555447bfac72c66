"""``engram-ray agent``: the node-local lookup agent as a plain process (no Ray needed)."""

from __future__ import annotations

import argparse
import json
import os
import time

from .common import add_cache_args, add_table_args, cache_bytes, table_layout


def _layout(args: argparse.Namespace):  # -> TableLayout
    from ..core.layout import TableLayout

    if args.layout:
        with open(args.layout) as f:
            return TableLayout.from_dict(json.load(f))
    return table_layout(args)[0]


def _cmd_agent(args: argparse.Namespace) -> int:
    from ..agent import process
    from ..rpc.wire import read_token_file

    token = read_token_file(args.token_file) if args.token_file else None
    addresses = [a.split("|") if "|" in a else a for a in args.addresses.split(",") if a]
    if not addresses:
        raise ValueError("--addresses: give HOST:PORT of every shard, in shard order")
    layout = _layout(args)
    path = args.socket or process.default_socket_path(layout.fingerprint)

    def ready(agent) -> None:
        print(f"lookup agent serving {layout.fingerprint} on {agent.path}", flush=True)
    return process.run(addresses, layout, path, token=token, ready=ready,
                       cache_bytes=cache_bytes(args.cache_gib), cache_policy=args.cache_policy)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node-local lookup agent (workers read rows through it)",
                       description="Serve a memory service's rows to this node's workers through a Unix "
                                   "socket and shared memory; routing, retries and failover stay in the "
                                   "EngramClient the agent owns.")
    p.add_argument("--addresses", required=True, metavar="HOST:PORT,...",
                   help="every shard's address in shard order (copies of one shard joined with '|')")
    p.add_argument("--layout", metavar="FILE.json", help="the table layout (TableLayout.to_dict) instead of "
                                                          "--preset/--config and --tokenizer")
    add_table_args(p, "demo")
    p.add_argument("--token-file", metavar="FILE", help="file holding the service's client token")
    p.add_argument("--socket", metavar="PATH", help="Unix socket to serve on (default: per layout, under "
                                                    "$TMPDIR/engram-agent-UID/)")
    add_cache_args(p)
    p.set_defaults(func=_cmd_agent)
    _register_measure(sub)


def _serve_table(preset: str, socket_path: str, shards: int, cores: set[int] | None) -> None:
    """Child of agent-measure: ``shards`` in-process shards of ``preset`` over a 50-id
    vocabulary and a lookup agent, on ``cores`` (set before any thread starts: all inherit it)."""
    import numpy as np

    from .. import config as C
    from ..agent import LookupAgent
    from ..client import EngramClient
    from ..core.layout import TableLayout
    from ..core.tokens import CompressedVocab
    from ..rpc import create_server
    from ..store import TableShard

    if cores:
        os.sched_setaffinity(0, cores)
    layout = TableLayout.build(C.preset(preset), CompressedVocab(np.arange(50)))
    servers = [create_server(TableShard.create(layout, shards, i), "127.0.0.1", 0) for i in range(shards)]
    client = EngramClient([f"127.0.0.1:{p}" for _, p in servers], layout)
    LookupAgent(client, socket_path).start()
    while os.getppid() != 1:  # until the measuring parent is gone
        time.sleep(0.5)


def _cmd_measure(args: argparse.Namespace) -> int:
    import multiprocessing as mp
    import tempfile

    import numpy as np

    from .. import config as C
    from ..agent import AgentClient
    from ..agent.measure import worker_cost
    from ..core.layout import TableLayout
    from ..core.tokens import CompressedVocab

    layout = TableLayout.build(C.preset(args.preset), CompressedVocab(np.arange(50)))
    cores = sorted(os.sched_getaffinity(0))
    isolate = len(cores) >= 2 and not args.no_isolate
    worker_cores, agent_cores = ({cores[0]}, set(cores[1:])) if isolate else (set(cores), None)
    path = os.path.join(tempfile.mkdtemp(prefix="engram-measure-"), "agent.sock")
    child = mp.get_context("spawn").Process(target=_serve_table, args=(args.preset, path, args.shards, agent_cores),
                                            daemon=True)
    child.start()
    os.sched_setaffinity(0, worker_cores)
    try:
        with AgentClient(path, layout, start=lambda: None, connect_timeout=120) as agent:
            rng = np.random.default_rng(0)
            layers = [rng.integers(0, layout.total_rows, size=args.ids) for _ in range(args.layers)]
            out = worker_cost(agent, layers, args.iters)
        out["cores"] = {"worker": sorted(worker_cores), "agent": sorted(agent_cores or worker_cores)}
        print(json.dumps(out, indent=1))
    finally:
        child.terminate()
        child.join(5)
    return 0


def _register_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent-measure", help="measure what the model's thread pays per fetch through the agent",
                       description="Serve a table and a lookup agent in a child process and time, in this "
                                   "process (the worker), issuing a fetch and reading its replies.")
    p.add_argument("--ids", type=int, default=2048, help="ids per layer (default 2048: 8 x 32 tokens x 8 heads)")
    p.add_argument("--layers", type=int, default=2, help="Engram layers per fetch (default 2)")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--no-isolate", action="store_true",
                   help="share every core (default with >= 2 cores: this process on the first, agent and "
                        "shards on the rest, as when the agent runs on cores of its own)")
    p.set_defaults(func=_cmd_measure)
