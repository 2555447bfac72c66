"""``engram-ray serve | status | stop | checkpoint | recover``: run a memory service and look at it."""

from __future__ import annotations

import argparse
import signal
import threading

from .common import add_store_args, add_table_args, engram_config, gib, read_copies, store_config, table_use


def _print_shards(shards: list[dict], qps: dict[tuple[int, int], float] | None = None) -> None:
    print(f"  {'shard':>5} {'health':<7} {'role':<8} {'address':<22} {'rows':>27} {'dtype':>9} {'resident':>11} "
          f"{'RSS':>11} {'lookups':>9} {'QPS':>7} {'p50 ms':>7} {'p99 ms':>7} {'updates':>8} {'rejected':>8}")
    notes = []
    for d in shards:
        if "error" in d:
            print(f"  {d['shard_index']:>5} {'DOWN':<7} {'':<8} {d['address']:<22} {d['error']}")
            continue
        state = d.get("state") or "serving"
        notes += [(d["shard_index"], d.get("replica", 0), n) for n in d.get("notes") or ()]
        c = d["counters"]
        rows = f"[{d['row_start']:,}, {d['row_stop']:,})"
        key = (d["shard_index"], d.get("replica", 0))
        rate = f"{qps[key]:,.1f}" if qps and key in qps else "-"
        role = d.get("role") or "single"
        role = role if role == "single" else f"{role[:7]}"
        health = {"serving": "up", "syncing": "SYNCING", "refusing": "REFUSES"}.get(state, state)
        print(f"  {d['shard_index']:>5} {health:<7} {role:<8} {d['address']:<22} {rows:>27} {d['dtype']:>9} "
              f"{gib(d['resident_bytes']):>11} {gib(d['rss_bytes']):>11} {c['lookups']:>9,} {rate:>7} "
              f"{c['lookup_p50_ms']:>7.2f} {c['lookup_p99_ms']:>7.2f} {c['updates']:>8,} {c['rejected']:>8,}")
    for shard, replica, note in notes:
        print(f"  shard {shard} copy {replica}: {note}")
    for d in shards:
        if d.get("storage") == "mmap":  # a disk-backed shard: how much of its file is in RAM now
            print(f"  shard {d['shard_index']} copy {d.get('replica', 0)}: rows memory-mapped, "
                  f"{gib(d['mapped_resident_bytes'])} of {gib(d['mapped_bytes'])} resident")
    _print_table_use([d for d in shards if "error" not in d])


def _print_table_use(shards: list[dict]) -> None:
    """Per (layer, order) table: the share of its rows lookups have read (HyperLogLog, summed
    over shards; of a shard's copies the one read most); per shard: the read skew."""
    best = read_copies(shards)
    if not best:
        return
    print("  table use since start (distinct rows read, HyperLogLog estimate):")
    for t in table_use(shards):
        print(f"    layer {t['layer']:>2} {t['order']}-grams: {t['touched']:>14,.0f} of {t['rows']:>14,.0f} rows "
              f"({100 * t['utilisation']:.3f} %)")
    skew = "; ".join(f"shard {i} top 1 % {100 * d['reads_top1pct_share']:.0f} %, top 10 % "
                     f"{100 * d['reads_top10pct_share']:.0f} %" for i, d in sorted(best.items()) if d["reads"])
    if skew:
        print(f"  read skew (share of reads to the most read rows, 1-in-64 sample): {skew}")


def service_config(args: argparse.Namespace):
    """ServiceConfig from --service-config FILE.json, then the flags that override it."""
    import dataclasses
    import json

    from ..config import ServiceConfig

    base = ServiceConfig()
    if args.service_config:
        with open(args.service_config) as f:
            base = ServiceConfig.from_dict(json.load(f))
    over = {k: v for k, v in (("tls_cert", args.tls_cert), ("tls_key", args.tls_key), ("tls_ca", args.tls_ca),
                              ("checkpoint_dir", args.checkpoint_dir),
                              ("checkpoint_every_s", args.checkpoint_every),
                              ("replicas", args.replicas), ("save_root", args.save_root))
            if v is not None}
    if args.no_auth:
        over["auth"] = False
    return dataclasses.replace(base, **over)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..data import default_vocab, load_tokenizer
    from ..runtime import deploy

    if args.detach and args.address is None:
        raise ValueError("--detach needs --address (an existing Ray cluster): a local Ray "
                         "started by this command ends with it")
    cfg, source = engram_config(args)
    store = store_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    print(f"deploying memory service {args.name!r}: {source}, {args.shards} shards, {store.dtype}"
          + (f", from checkpoint {args.checkpoint}" if args.checkpoint else ""))
    svc = deploy(cfg, vocab=vocab, num_shards=args.shards, store=store, name=args.name,
                 detached=args.detach, checkpoint=args.checkpoint, host=args.host,
                 address=args.address, service=service_config(args))
    shards = svc.describe()
    lay = svc.layout
    print(f"  layout      {lay.fingerprint}: {lay.total_rows:,} rows x {lay.row_dim} "
          f"({lay.num_params / 1e6:,.1f} M params)")
    print(f"  resident    {gib(sum(d['resident_bytes'] for d in shards))} (rows + optimiser state)")
    _print_shards(shards)
    print(f"  attach from Python: engram_ray.runtime.attach({args.name!r}).client()")
    if args.detach:
        print(f"detached: stop it with  engram-ray stop --name {args.name} --address {args.address}")
        return 0
    print("serving; Ctrl-C to stop")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping ...")
    svc.shutdown()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    from ..runtime import attach

    svc = attach(args.name, address=args.address)
    with svc.client(timeout=5, retries=0, resolver=None) as client:
        first = client.describe(tolerate=True, every_replica=True)
        t0 = time.monotonic()
        time.sleep(args.interval)  # QPS: lookups counted over this interval
        shards = client.describe(tolerate=True, every_replica=True)
        dt = time.monotonic() - t0

    def key(d):
        return d["shard_index"], d.get("replica", 0)
    before = {key(d): d["counters"]["lookups"] for d in first if "error" not in d}
    qps = {key(d): (d["counters"]["lookups"] - before[key(d)]) / dt
           for d in shards if "error" not in d and key(d) in before}
    down = sum("error" in d or d.get("state", "serving") != "serving" for d in shards)
    copies = len(shards)
    print(f"memory service {svc.name!r}: {svc.num_shards} shards x {copies // max(1, svc.num_shards)} "
          f"copies ({copies - down} of {copies} serving), layout "
          f"{svc.layout.fingerprint}, {svc.layout.num_params / 1e6:,.1f} M params, {svc.store.dtype}, "
          f"optimiser {svc.store.optimizer.kind}, auth {'on' if svc.token else 'off'}, "
          f"TLS {'on' if svc.tls_ca else 'off'}")
    _print_shards(shards, qps)
    return 1 if down else 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from ..runtime import attach

    svc = attach(args.name, address=args.address)
    if args.dir:
        paths = svc.save(args.dir)
        print(f"memory service {svc.name!r}: {len(paths)} shards saved into {args.dir} "
              "(loads into any shard count: engram-ray serve --checkpoint DIR)")
    else:
        paths = svc.checkpoint()
        print(f"memory service {svc.name!r}: recovery checkpoint of {len(paths)} shards "
              "(each reloads its newest after a restart):")
    for p in paths:
        print(f"  {p}")
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    from ..runtime import attach

    svc = attach(args.name, address=args.address)
    if not 0 <= args.shard < svc.num_shards:
        print(f"--shard {args.shard}: the service has shards 0..{svc.num_shards - 1}")
        return 2
    source = "init" if args.reset else args.source
    try:
        info = svc.recover(args.shard, args.replica, source)
    except Exception as e:  # noqa: BLE001 - the actor's error, as the operator should read it
        print(f"shard {args.shard} copy {args.replica}: {getattr(e, 'cause', None) or e}")
        return 1
    print(f"shard {args.shard} copy {args.replica} serves again: rows from {info['source']} "
          f"(now its recovery point; unusable checkpoints renamed *.unusable)")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from ..runtime import attach

    svc = attach(args.name, address=args.address)
    svc.shutdown()
    print(f"stopped memory service {args.name!r} ({svc.num_shards} shards)")
    return 0


def register(sub) -> None:
    _add_serve(sub)
    _add_service_commands(sub)
    _add_recover(sub)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="deploy a memory service (local Ray, or --address auto on a cluster)",
                       description="Start one shard actor per shard, on memory nodes where the "
                                   "cluster has them; print addresses, layout and resident GiB; "
                                   "serve until Ctrl-C (or --detach).")
    add_table_args(p, "demo")
    p.add_argument("--shards", type=int, default=2, help="number of shards (default: 2)")
    add_store_args(p)
    p.add_argument("--checkpoint", metavar="DIR", help="load rows from this checkpoint (any shard count)")
    p.add_argument("--name", default="engram", help="service name to attach by (default: engram)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto (default: start a local Ray)")
    p.add_argument("--host", default=None,
                   help="address the shards bind to (default: loopback on one node, else the node's)")
    p.add_argument("--detach", action="store_true", help="leave the service running and exit")
    g = p.add_argument_group("service: security, limits, recovery (ServiceConfig)")
    g.add_argument("--service-config", metavar="FILE.json", help="ServiceConfig as JSON (keys = its fields)")
    g.add_argument("--no-auth", action="store_true",
                   help="no token on the data plane (default: a secret token, handed to attach()ed clients)")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate chain, same path on every memory node")
    g.add_argument("--tls-key", metavar="PEM", help="its private key")
    g.add_argument("--tls-ca", metavar="PEM", help="CA the clients trust (default: the certificate itself)")
    g.add_argument("--replicas", type=int, default=None, help="copies of each shard on different nodes (default: 1)")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where shards write recovery checkpoints and reload the newest after a restart")
    g.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                   help="seconds between automatic recovery checkpoints (default: on demand only)")
    g.add_argument("--save-root", metavar="DIR",
                   help="directory on each memory node under which `engram-ray checkpoint --dir` may write "
                        "portable checkpoints (default: none, and such saves are refused)")
    p.set_defaults(func=_cmd_serve)


def _add_service_commands(sub) -> None:
    """status, stop and checkpoint: commands on a running service, found by name."""
    for name, fn, help_text in (
            ("status", _cmd_status, "per-shard health, rows, RSS, QPS and p50/p99 of a running service "
                                    "(exit 1 if a shard is down)"),
            ("stop", _cmd_stop, "shut down a running service"),
            ("checkpoint", _cmd_checkpoint, "checkpoint a running service: a recovery point now, or with "
                                            "--dir a portable checkpoint for any shard count")):
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--name", default="engram", help="service name (default: engram)")
        p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
        if name == "status":
            p.add_argument("--interval", type=float, default=1.0,
                           help="seconds between the two reads that give QPS (default: 1)")
        if name == "checkpoint":
            p.add_argument("--dir", metavar="DIR", help="write a full checkpoint here, relative to the "
                                                        "service's --save-root on every memory node; default: "
                                                        "a recovery checkpoint into its checkpoint_dir")
        p.set_defaults(func=fn)


def _add_recover(sub) -> None:
    p = sub.add_parser(
        "recover", help="operator's override for a shard that refuses to serve (every recovery "
                        "checkpoint unusable): serve the initial rows or a checkpoint instead",
        description="A shard copy whose recovery checkpoints all fail to load does not start again from "
                    "its initial rows on its own (that would silently lose every update they held): it "
                    "refuses data calls, and `engram-ray status` shows why. Once you have looked at the "
                    "evidence, tell it what to serve. The unusable checkpoints are renamed "
                    "ckpt-N.unusable, never deleted.")
    p.add_argument("--name", default="engram", help="service name (default: engram)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--shard", type=int, required=True, help="index of the shard that refuses")
    p.add_argument("--replica", type=int, default=0, help="its copy (default: 0)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reset", action="store_true", help="serve the initial rows (every update is lost)")
    what.add_argument("--from", dest="source", metavar="DIR",
                      help="serve the rows of this checkpoint directory (on the shard's node)")
    p.set_defaults(func=_cmd_recover)
