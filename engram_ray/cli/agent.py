"""``engram-ray agent``: the node-local lookup agent as a plain process (no Ray needed)."""

from __future__ import annotations

import argparse
import json

from .common import add_table_args, engram_config


def _layout(args: argparse.Namespace):  # -> TableLayout
    from ..core.layout import TableLayout
    from ..data import default_vocab, load_tokenizer

    if args.layout:
        with open(args.layout) as f:
            return TableLayout.from_dict(json.load(f))
    cfg, _ = engram_config(args)
    return TableLayout.build(cfg, default_vocab(load_tokenizer(args.tokenizer)))


def _cmd_agent(args: argparse.Namespace) -> int:
    from ..agent import process

    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    addresses = [a.split("|") if "|" in a else a for a in args.addresses.split(",") if a]
    if not addresses:
        raise ValueError("--addresses: give HOST:PORT of every shard, in shard order")
    layout = _layout(args)
    path = args.socket or process.default_socket_path(layout.fingerprint)

    def ready(agent) -> None:
        print(f"lookup agent serving {layout.fingerprint} on {agent.path}", flush=True)
    return process.run(addresses, layout, path, token=token, ready=ready)


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
    p.set_defaults(func=_cmd_agent)
