"""``engram-ray shard``: serve one shard of a table as a plain process, without Ray.

The same server the Ray actor wraps (:class:`~engram_ray.rpc.host.ShardHost`), for machines
where Ray is not installed or not wanted: start one process per shard, hand the addresses to
an ``EngramClient(addresses, layout, token=...)``. Nothing here imports ray, torch or the
runtime (checked by a test that runs it with ray hidden).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from .common import add_store_args, add_table_args, store_config, table_layout


def read_token(args: argparse.Namespace) -> str | None:
    """The clients' token from ``--token-file`` (surrounding whitespace stripped), or None
    with ``--no-auth``. A token never goes on the command line, where ``ps`` shows it."""
    if args.no_auth:
        return None
    if not args.token_file:
        raise ValueError("give --token-file FILE (the clients' secret) or --no-auth")
    from ..rpc.wire import read_token_file

    return read_token_file(args.token_file)


def _write_ready(path: str, address: str) -> None:
    """Write ``address`` into ``path`` atomically: a reader sees no file or the whole line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(address + "\n")
    os.replace(tmp, path)


def _service(args: argparse.Namespace):
    from ..config import ServiceConfig

    return ServiceConfig(auth=not args.no_auth, checkpoint_dir=args.checkpoint_dir or "",
                         checkpoint_every_s=args.checkpoint_every or 0.0, save_root=args.save_root or "",
                         **({} if args.max_lookup_streams is None else {"max_lookup_streams": args.max_lookup_streams}))


def _cmd_shard(args: argparse.Namespace) -> int:
    from ..rpc.host import ShardHost
    from ..store.recovery import recovery_dir_name

    if not 0 <= args.index < args.shards:
        raise ValueError(f"--index {args.index}: expected 0..{args.shards - 1} for --shards {args.shards}")
    token = read_token(args)
    layout, source = table_layout(args)
    store = store_config(args)
    if args.max_resident_gib is not None:
        from ..core.plan import resident_rows_per_shard

        cap = resident_rows_per_shard(layout, store.dtype, args.shards, args.max_resident_gib)
        store = dataclasses.replace(store, resident_rows_per_shard=cap)
    recovery = (Path(args.checkpoint_dir) / recovery_dir_name(args.index, args.shards)
                if args.checkpoint_dir else None)
    stop = threading.Event()
    # Handlers first: a SIGTERM that arrives while the rows load still stops the process cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    host = ShardHost(layout, store, _service(args), args.shards, args.index, host=args.host, port=args.port,
                     token=token, checkpoint=args.checkpoint, recovery_dir=recovery, name=args.name)
    address = host.address()
    try:
        if args.ready_file:
            _write_ready(args.ready_file, address)
        print(f"shard {args.index}/{args.shards} of {source} ({layout.fingerprint}, {store.dtype}) rows "
              f"[{host.shard.row_start:,}, {host.shard.row_stop:,})"
              f"{f' ({host.shard.resident_rows:,} resident)' if host.shard.capped else ''}"
              f" serving on {address} "
              f"(rows from {host.servicer.rows_from}, auth {'on' if token else 'off'}); "
              "SIGTERM or Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):  # a timed wait: signal handlers run between waits
            pass
    finally:
        host.stop(args.grace)
        if args.ready_file and Path(args.ready_file).exists():
            Path(args.ready_file).unlink()  # no stale address once the shard is gone
    print(f"shard {args.index} stopped", file=sys.stderr, flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("shard", help="serve one shard of a table as a plain process (no Ray)",
                       description="Serve shard --index of --shards of a table over gRPC, as a plain "
                                   "process: the server the Ray actor wraps, for machines without Ray. "
                                   "Connect with EngramClient([addresses of every shard], layout, token=...).")
    add_table_args(p, "demo")
    p.add_argument("--shards", type=int, default=2, help="number of shards of the table (default: 2)")
    p.add_argument("--index", type=int, required=True, help="which shard this process serves (0-based)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind (default: 0, a free one)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token-file", metavar="FILE", help="file holding the clients' secret token")
    auth.add_argument("--no-auth", action="store_true", help="no token on the data plane")
    add_store_args(p)
    p.add_argument("--max-resident-gib", type=float, metavar="GIB",
                   help="benchmarks: RAM for the whole table's rows, split evenly over --shards; "
                        "row r is read as r mod the rows kept (lookups only: pushes are refused), "
                        "so a 100B layout serves from a small machine, as bench offload's deploy does")
    p.add_argument("--checkpoint", metavar="DIR", help="load rows from this checkpoint (any shard count)")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="recovery checkpoints: reload the newest at start, write one on request")
    p.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="seconds between automatic recovery checkpoints (default: on request only)")
    p.add_argument("--max-lookup-streams", type=int, metavar="N",
                   help="LookupStreams served at once, each on a thread of its own (default: 16; 0: none, "
                        "clients use Lookup)")
    p.add_argument("--save-root", metavar="DIR", help="directory under which Save may write checkpoints")
    p.add_argument("--name", default="engram", help="service name, shown in messages (default: engram)")
    p.add_argument("--ready-file", metavar="PATH", help="write the bound HOST:PORT here once serving "
                                                        "(removed again on stop)")
    p.add_argument("--grace", type=float, default=1.0, help="seconds calls in flight get at stop (default: 1)")
    p.set_defaults(func=_cmd_shard)
