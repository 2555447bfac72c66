"""``engram-ray bench interference``: what the memory side's kind of work on the memory cores
costs the model's compute on the compute cores of this machine (see bench/interference.py)."""

from __future__ import annotations

import argparse
import dataclasses

from ..bench.interference import LOADS
from ..config import MODEL_PRESETS

__all__ = ["add"]


def _cmd(args: argparse.Namespace) -> int:
    from ..bench import interference
    from ..bench.common import write_report
    from ..bench.plot import plot_interference
    from ..config import model_preset
    from .bench import _plot_beside

    cfg = dataclasses.replace(model_preset(args.model), n_layers=args.layers)
    report = interference.run(cfg, rounds=args.rounds, batch=args.decode_batch, positions=args.positions,
                              table_gib=args.table_gib, row_bytes=args.row_bytes, rows=args.rows,
                              loads=tuple(args.loads), cadence_ms=args.cadence_ms, progress=True)
    write_report(report, args.out)
    iso = report["isolation"]
    print(f"decode-shaped forward ({args.model}, {args.layers} layers, batch {args.decode_batch} x {args.positions} "
          f"positions) on cores {iso['compute_cores']}; one load process per memory core {iso['memory_cores']}:")
    for kind, r in report["results"].items():
        q1, q3 = r["slowdown_quartiles"]
        rate = "" if kind == "idle" else f"   load: {r['rate_per_s']:,.0f} {r['rate_unit']}/s" + (
            f" ({r['gib_per_s']:.2f} GiB/s{' read+write' if kind == 'stream' else ''})" if "gib_per_s" in r else "")
        print(f"  {kind:<7} {1e3 * r['median_s']:8.1f} ms  {100 * r['slowdown']:+6.1f} % "
              f"[{100 * q1:+.1f}, {100 * q3:+.1f}]{rate}")
        if kind == "decode":
            cpu = ", ".join(f"{role} {us:,.0f} us" for role, us in r["cpu_us_per_step"].items())
            print(f"          a step every {r['cadence_ms']:.1f} ms ({100 * r['pace_kept']:.0f} % of that pace kept); "
                  f"CPU per step: {cpu}; the memory side kept {100 * r['memory_side_busy']:.1f} % of its cores busy")
    _plot_beside(args.out, lambda png: plot_interference(report, png))
    return 0


def add(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser("interference", help="how much work on the memory cores slows compute on the compute "
                                             "cores of this machine (spin, row gathers, memory streaming, "
                                             "gRPC lookups)",
                        description="Run bench offload's decode-shaped forward on the compute cores while one "
                                    "process per memory core runs flat out at one kind of work: nothing, Python "
                                    "arithmetic, random row gathers from a table (a shard's lookups without "
                                    "gRPC), memory streaming, or gRPC lookups of a real shard (server and client "
                                    "in one process), each round paired with its own idle run. Those "
                                    "loads run far above a memory side's real traffic: the slowdowns bound what "
                                    "such work can cost the model through the machine's shared cache, memory and "
                                    "power. The decode load is not flat out: bench offload's memory side (two "
                                    "shards and the lookup agent, as plain processes) answering one decode step's "
                                    "lookups per step of the forward, asked by a driver on the memory cores that "
                                    "stands in for the worker, with each role's CPU per step: what the memory side "
                                    "costs the model here.")
    b.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS), help="backbone preset (default: demo)")
    b.add_argument("--layers", type=int, default=16, help="backbone layers (default: 16, as bench offload's)")
    b.add_argument("--decode-batch", type=int, default=8, help="sequences per step (default: 8)")
    b.add_argument("--positions", type=int, default=64, help="decode steps per timed run (default: 64)")
    b.add_argument("--rounds", type=int, default=5, help="rounds over the loads (default: 5)")
    b.add_argument("--table-gib", type=float, default=1.0,
                   help="the gather and lookup loads' table, per memory core, and the decode load's, over its two "
                        "shards (default: 1 GiB, as bench offload's resident rows)")
    b.add_argument("--row-bytes", type=int, default=320,
                   help="bytes per row of the gather load (default: 320, the 100B table's fp32 rows, which "
                        "the lookup load serves)")
    b.add_argument("--rows", type=int, default=256,
                   help="rows per lookup (default: 256, a decode step's 2 layers x 8 tokens x 16 heads)")
    b.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS),
                   help="loads to run (default: all; idle is needed)")
    b.add_argument("--cadence-ms", type=float, default=None, metavar="MS",
                   help="the decode load's step: one decode step's lookups every MS (default: one step of the "
                        "timed forward, the pace of bench offload's decode)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.png")
    b.set_defaults(func=_cmd)
