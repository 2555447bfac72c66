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


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON out (hash, lookup; offload and "
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
