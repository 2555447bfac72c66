"""``engram-ray bench overlap``: what a decode step's lookups cost the compute around them on
this machine, with the shards beside the model and with the agent alone (see bench/overlap.py)."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import MODEL_PRESETS
from .common import add_table_args, engram_config

__all__ = ["add"]

#: bench.overlap.SETTINGS, named here so that --help does not import torch (a test keeps them equal).
SETTINGS = ("shards", "agent_only")


def _cmd(args: argparse.Namespace) -> int:
    from ..bench import overlap
    from ..bench.common import write_report
    from ..config import model_preset
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    base = model_preset(args.model)
    model = dataclasses.replace(base, vocab_size=max(base.vocab_size, vocab.num_tokens))
    report = overlap.run(cfg, model, vocab, iterations=args.iterations, batch=args.decode_batch, layers=args.layers,
                         shards=args.shards, max_resident_gib=args.max_resident_gib,
                         settings=tuple(args.settings), progress=True)
    report["source"] = source
    write_report(report, args.out)
    c = report["chunk"]
    before = " (the blocks before the first Engram layer)" if c["layers"] == c["first_engram_layer"] else ""
    print(f"one decode step of {c['layers']} blocks{before} of {args.model}, batch {c['decode_batch']}, "
          f"no output head, on cores {report['isolation'].get('compute_cores')}; memory side on "
          f"{report['isolation'].get('memory_cores')}. Extra microseconds of that step, paired with the same "
          "iteration's 'none' run of its setting, median [quartiles]:")
    for setting, r in report["results"].items():
        print(f"  {setting} (a lookup round trip: {r['round_trip_us']:,.0f} us; the reader polls for "
              f"{1e3 * (r['spin_s'] or 0):g} ms before it sleeps)")
        for cond, x in r["conditions"].items():
            q1, q3 = x["extra_us_quartiles"]
            print(f"    {cond:<9} {x['median_us']:8,.0f} us   {x['extra_us']:+7.0f} us [{q1:+.0f}, {q3:+.0f}]  "
                  f"({100 * x['slowdown']:+.1f} %)")
        for key, what in (("sleep_us", "sleeping, beyond polling (idle - idle_poll)"),
                          ("memory_work_us", "the memory side's work, beyond the wait (after - idle_poll)")):
            m = r[key]
            print(f"    {what}: {m['median']:+.0f} us [{m['quartiles'][0]:+.0f}, {m['quartiles'][1]:+.0f}]")
        if r["timed_cache_misses"] is not None:
            print(f"    rows the timed lookups fetched from a shard despite the cache: {r['timed_cache_misses']} (the "
                  "cache re-asks a shard that has been silent for a second, to see pushes by other writers)")
    return 0


def add(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("overlap", help="what a decode step's lookups cost the compute around them, with the "
                                        "shards on this machine and with the agent alone",
                        description="Time one decode step of a backbone of the blocks before the first Engram "
                                    "layer (the compute a step's first lookup overlaps) on the compute cores: "
                                    "alone, after a sleep as long as a lookup, with the step's lookups in "
                                    "flight, and right after they came in -- with every lookup answered by a "
                                    "shard on this machine's memory cores (as bench offload runs), and with "
                                    "the agent's row cache answering all of them (the shards idle: what a "
                                    "compute node keeps when the shards live on memory nodes). Each condition "
                                    "is paired with its iteration's baseline run.")
    add_table_args(b, "table_100b")
    b.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS), help="backbone preset (default: demo)")
    b.add_argument("--layers", type=int, default=None,
                   help="blocks in the timed step (default: those before the table's first Engram layer)")
    b.add_argument("--decode-batch", type=int, default=8, help="sequences per step (default: 8, as bench offload's)")
    b.add_argument("--iterations", type=int, default=200, help="timed iterations per setting (default: 200)")
    b.add_argument("--shards", type=int, default=2, help="shards of the table (default: 2)")
    b.add_argument("--max-resident-gib", type=float, default=1.0,
                   help="RAM for the table's rows in all (default: 1.0, as bench offload's)")
    b.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="memory settings to run (default: both)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd)
