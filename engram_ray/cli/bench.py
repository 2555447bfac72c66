"""``engram-ray bench ...``: benchmarks that write JSON reports."""

from __future__ import annotations

import argparse

from .common import add_table_args, engram_config


def _cmd_bench_hash(args: argparse.Namespace) -> int:
    from ..bench import hash as bench_hash
    from ..bench.common import write_report

    cfg, source = engram_config(args)
    report = bench_hash.run(cfg, repeats=args.repeats, progress=True)
    report["source"] = source
    write_report(report, args.out)
    print(f"NgramHasher vs the reference's per-head loop ({source}, {report['layers']} layers x "
          f"{report['heads_per_layer']} heads; median of {args.repeats}; {report['machine']['cpu']})")
    print(f"  {'phase':<8} {'batch':>6} {'seq':>6} {'ours tok/s':>14} {'reference tok/s':>16} {'speedup':>8}")
    for r in report["results"]:
        print(f"  {r['phase']:<8} {r['batch']:>6} {r['seq_len']:>6} {r['ours_tokens_per_s']:>14,.0f} "
              f"{r['reference_tokens_per_s']:>16,.0f} {r['speedup']:>7.2f}x")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_bench_lookup(args: argparse.Namespace) -> int:
    from ..bench import lookup as bench_lookup
    from ..bench.common import write_report
    from ..config import StoreConfig
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    report = bench_lookup.run(cfg, vocab, shard_counts=args.shards, batch_sizes=args.batch,
                              repeats=args.repeats, store=StoreConfig(dtype=args.dtype), progress=True)
    report["source"] = source
    write_report(report, args.out)
    print(f"EngramClient lookup vs in-process gather ({source}, {report['table_rows']:,} rows of "
          f"{report['row_bytes']} B, {args.dtype}; median of {args.repeats}; {report['machine']['cpu']}, "
          f"{report['machine']['cores']} cores)")
    print(f"  {'shards':>6} {'rows':>8} {'client rows/s':>14} {'GB/s':>6} {'local rows/s':>14} "
          f"{'GB/s':>6} {'client/local time':>18} {'p50 ms':>8}")
    for r in report["results"]:
        print(f"  {r['shards']:>6} {r['rows']:>8,} {r['client_rows_per_s']:>14,.0f} {r['client_gb_per_s']:>6.2f} "
              f"{r['local_rows_per_s']:>14,.0f} {r['local_gb_per_s']:>6.2f} {r['client_over_local']:>17.1f}x "
              f"{r['client_p50_ms']:>8.2f}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out: hash, lookup (offload and "
                                     "latency-vs-size come with issue #5)",
                       description="Benchmarks. Each writes JSON with --out.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    b = bsub.add_parser("hash", help="tokens/s of the n-gram hasher vs the reference's loop",
                        description="Hashing throughput at prefill and decode shapes, "
                                    "interleaved with the reference algorithm.")
    add_table_args(b, "paper_27b")
    b.add_argument("--repeats", type=int, default=7, help="timed repetitions, median quoted (default: 7)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_hash)

    b = bsub.add_parser("lookup", help="rows/s and GB/s through the client vs an in-process gather",
                        description="Deploy the memory service on a local Ray with each shard count "
                                    "and time client lookups against gathering the same rows in-process.")
    add_table_args(b, "demo")
    b.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts (default: 1 2)")
    b.add_argument("--batch", type=int, nargs="+", default=[1024, 16384, 131072],
                   help="distinct rows per lookup (default: 1024 16384 131072)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--repeats", type=int, default=7, help="timed repetitions, median quoted (default: 7)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_lookup)
