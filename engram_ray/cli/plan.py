"""``engram-ray plan``: memory nodes, shards, GiB per node and network per GPU worker."""

from __future__ import annotations

import argparse
import json

from .common import add_table_args, engram_config


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..config import with_table_params
    from ..core.layout import TableLayout
    from ..core.plan import plan_capacity
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    if args.table_params is not None:
        cfg = with_table_params(cfg, args.table_params)
        source = f"{source} geometry at {args.table_params:g} params"
    layout = TableLayout.build(cfg, default_vocab(load_tokenizer(args.tokenizer)))
    table_arg = f"--preset {args.preset}" if args.table_params is None and not args.config else None
    if args.save_config:
        cfg.to_json(args.save_config)
        table_arg = f"--config {args.save_config}"
    elif args.config and args.table_params is None:
        table_arg = f"--config {args.config}"
    p = plan_capacity(layout, dtype=args.dtype, node_ram_gib=args.node_ram_gib, headroom=args.headroom,
                      optimizer=args.optimizer, replicas=args.replicas, shards=args.shards,
                      shards_per_node=args.shards_per_node, dedup_ratio=args.dedup,
                      tokens_per_s=args.tokens_per_s)
    if args.json:
        print(json.dumps(dict(p.to_dict(), source=source, fingerprint=layout.fingerprint,
                              ray_resources=p.ray_resources()), indent=2))
        return 0
    train = p.optimizer != "none"
    print(f"Capacity plan: {source}")
    print(f"  table         {p.table_params:,} params ({p.table_params / 1e9:.2f} B), {p.table_rows:,} rows x "
          f"{p.row_dim}, {p.dtype}: {p.table_bytes / 2**30:,.1f} GiB")
    state = f" + {p.optimizer} state" if train else ""
    print(f"  resident      {p.resident_bytes / 2**30:,.1f} GiB (rows{state}, x{p.replicas} "
          f"replica{'s' if p.replicas > 1 else ''})")
    print(f"  memory nodes  {p.memory_nodes} x {p.node_ram_gib:g} GiB ({p.usable_gib_per_node:,.1f} GiB each for "
          f"shards, {p.headroom:.0%} headroom)")
    print(f"  shards        {p.shards}{f' x {p.replicas} replicas' if p.replicas > 1 else ''}, "
          f"{p.shard_gib:,.2f} GiB each, up to {p.shards_per_node} per node")
    print(f"  per node      {p.gib_per_node:,.1f} GiB of shards, {p.free_gib_per_node:,.1f} GiB left")
    res = ", ".join(f"{k}: {v}" for k, v in p.ray_resources().items())
    print(f"  ray resources per memory node: {{{res}}}   (cluster/*.yaml)")
    print(f"  per token     {p.ids_per_token} row ids x dedup {p.dedup_ratio:g} -> "
          f"{p.lookup_bytes_per_token:,.0f} B looked up" + (f", {p.push_bytes_per_token:,.0f} B of gradients pushed"
                                                            if train else ""))
    print(f"  per GPU worker at {p.tokens_per_s:,.0f} tokens/s: {p.lookup_gbit_per_s:,.2f} Gbit/s of lookups"
          + (f", {p.train_gbit_per_s:,.2f} Gbit/s training" if train else ""))
    if table_arg is None:
        table_arg = "--config FILE.json  (write it with --save-config FILE.json)"
    print(f"  deploy        engram-ray serve --address auto --detach {table_arg} --shards {p.shards} "
          f"--dtype {p.dtype}" + (f" --replicas {p.replicas}" if p.replicas > 1 else "")
          + ("" if train else " --optimizer none"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity planning: shards, memory nodes, GiB and bandwidth per worker",
                       description="How many memory nodes and shards a table needs, the GiB on each "
                                   "node with headroom, and the bytes per token and network bandwidth "
                                   "a GPU worker needs. From a preset or config file, or a preset's "
                                   "geometry resized to --table-params.",
                       epilog="example: engram-ray plan --table-params 100e9 --dtype bf16 --node-ram-gib 512")
    add_table_args(p, "paper_27b")
    p.add_argument("--table-params", type=float, metavar="N",
                   help="resize the table to about N parameters (e.g. 100e9), keeping the geometry")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype: float32, bfloat16/bf16, float16/fp16 "
                                                        "(default: bfloat16)")
    p.add_argument("--node-ram-gib", type=float, default=512.0, help="RAM of one memory node (default: 512)")
    p.add_argument("--headroom", type=float, default=0.2,
                   help="fraction of a node's RAM kept free for the OS, Ray and buffers (default: 0.2)")
    p.add_argument("--optimizer", default="none", choices=["none", "sgd", "adam"],
                   help="optimiser state the shards keep: none to serve, adam to train (default: none)")
    p.add_argument("--replicas", type=int, default=1, help="copies of each shard, on different nodes (default: 1)")
    p.add_argument("--shards", type=int, default=None, help="fix the shard count (default: shards-per-node "
                                                             "on each node needed)")
    p.add_argument("--shards-per-node", type=int, default=4,
                   help="shard processes per memory node, for parallel gathers (default: 4)")
    p.add_argument("--dedup", type=float, default=1.0,
                   help="distinct/all row ids in a batch; 1.0 is the worst case, ~0.5 measured (default: 1.0)")
    p.add_argument("--tokens-per-s", type=float, default=10_000.0,
                   help="tokens/s of one GPU worker, for its bandwidth (default: 10000)")
    p.add_argument("--save-config", metavar="FILE.json",
                   help="write the (resized) Engram config here, for engram-ray serve --config")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)
