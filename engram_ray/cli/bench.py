"""``engram-ray bench ...``: benchmarks that write JSON reports."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import DTYPE_ALIASES, MODEL_PRESETS, PRESETS, STORE_DTYPES, store_dtype
from . import interference, overlap
from .common import add_cache_args, add_table_args, add_tokenizer_arg, cache_bytes, engram_config, table_layout


def _plot_beside(out: str | None, plot) -> None:
    """With --out FILE.json: draw ``plot(FILE.png)`` beside it and say what was written."""
    if out:
        from pathlib import Path
        png = Path(out).with_suffix(".png")
        plot(png)
        print(f"wrote {out} and {png}")


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
    from ..bench.plot import plot_rates
    for r in report["results"]:
        r["tokens"] = r["batch"] * r["seq_len"]
    _plot_beside(args.out, lambda png: plot_rates(
        report, png, x="tokens",
        series={"ours_tokens_per_s": "NgramHasher", "reference_tokens_per_s": "reference loop"},
        xlabel="tokens per call (batch x seq)", ylabel="tokens/s",
        title=f"Hashing throughput ({source}, {report['layers']} layers x {report['heads_per_layer']} heads)"))
    return 0


def _cmd_bench_lookup(args: argparse.Namespace) -> int:
    from ..bench import lookup as bench_lookup
    from ..bench.common import write_report
    from ..config import OptimizerConfig, StoreConfig
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    report = bench_lookup.run(cfg, vocab, shard_counts=args.shards, batch_sizes=args.batch,
                              repeats=args.repeats, progress=True,
                              store=StoreConfig(dtype=args.dtype, optimizer=OptimizerConfig(kind="none")))
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
    from ..bench.plot import plot_rates
    _plot_beside(args.out, lambda png: plot_rates(
        report, png, x="rows", series={"client_gb_per_s": "client", "local_gb_per_s": "in-process"},
        group="shards", xlabel="distinct rows per lookup", ylabel="GB/s",
        title=f"Lookup throughput ({source}, {report['row_bytes']} B rows)"))
    return 0


def _offload_options(args: argparse.Namespace) -> Any:
    from ..bench.memory_source import parse_addresses
    from ..bench.offload import Options

    return Options(
        shards=args.shards, max_resident_gib=args.max_resident_gib or None, sequences=args.sequences,
        min_len=args.min_len, max_len=args.max_len, decode_batch=args.decode_batch,
        decode_tokens=args.decode_tokens, requests=args.requests, prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len), max_batch=args.max_batch, token_budget=args.token_budget,
        microbatches=args.microbatches,
        repeats=args.repeats, device=args.device, dtype=store_dtype(args.dtype),
        memory_at=tuple(parse_addresses(args.memory_at)) if args.memory_at else (),
        token_file=args.token_file, via=args.via, cache_bytes=cache_bytes(args.cache_gib),
        cache_policy=args.cache_policy, agent_spin_s=None if args.agent_spin_ms is None else args.agent_spin_ms / 1e3,
        isolate=not args.no_isolate, memory_cores=args.memory_cores, lookup_streams=args.lookup_streams,
        profile=args.profile, trace=args.trace, progress=True)


def _offload_model(name: str, cfg: Any, tokens: Any, longest: int) -> Any:
    """The backbone preset, deep enough to hold the table's Engram layers (the 100B table sits
    at layers 2 and 15, as in the paper's 27B model), long enough for the workload, and with
    room for every token id of the corpus."""
    import dataclasses

    from ..config import model_preset
    base = model_preset(name)
    return dataclasses.replace(base, n_layers=max(base.n_layers, max(cfg.layer_ids) + 1),
                               max_seq_len=max(base.max_seq_len, longest),
                               vocab_size=max(base.vocab_size, int(tokens.max()) + 1))


def _cmd_bench_offload(args: argparse.Namespace) -> int:
    from ..bench import offload as bench_offload
    from ..bench.common import write_report
    from ..bench.plot import plot_offload
    from ..data import default_vocab, load_corpus, load_tokenizer

    cfg, source = engram_config(args)
    tok = load_tokenizer(args.tokenizer)
    vocab = default_vocab(tok)
    corpus = load_corpus("stdlib", tok)
    opts = _offload_options(args)
    model = _offload_model(args.model, cfg, corpus.val, opts.longest())
    report = bench_offload.run(cfg, model, vocab, corpus.val, opts)
    report["source"], report["model_preset"] = source, args.model
    write_report(report, args.out)
    _print_offload(report)
    _plot_beside(args.out, lambda png: plot_offload(report, png))
    return 0


def _print_offload(report: dict[str, Any]) -> None:
    t, iso, phases = report["table"], report["isolation"], report["phases"]
    print(f"Engram offload ({report['source']}: {t['logical_params'] / 1e9:.2f}B params, "
          f"{t['logical_gib_float32']:.1f} GiB fp32 logical, {t['resident_gib_float32']:.2f} GiB resident"
          f"{' (capped)' if t['capped'] else ''}, {t['shards']} shards via {report['memory']['via']}; "
          f"{report['machine']['cpu']}, {report['machine']['cores']} cores, device {report['device']}, "
          f"{report['dtype']})")
    print("  cores: " + (f"model on {iso['compute_cores']}, memory side on {iso['memory_cores']} "
                         f"({'checked' if iso['ok'] else 'NOT as asked: see isolation in the JSON'})"
                         if iso["enabled"] else "shared (not isolated)"))
    print(f"  {'mode':<12}" + "".join(f" {ph + ' tok/s':>15}" for ph in phases))
    for m, r in report["results"].items():
        print(f"  {m:<12}" + "".join(f" {r[ph + '_tokens_per_s']:>15,.0f}" for ph in phases))
    o = report["overhead"]
    for ph in phases:
        print(f"  {ph:<8} overhead: remote (prefetch) {100 * o[ph + ':remote_vs_local']:+.1f}% vs local, "
              f"{100 * o[ph + ':remote_vs_no_engram']:+.1f}% vs no Engram; on demand "
              f"{100 * o[ph + ':remote_lazy_vs_local']:+.1f}% vs local")
    pairs = [report["overhead_paired"][ph + ":remote_vs_local"] for ph in phases]
    print("  remote vs local, paired within each repetition: "
          + "; ".join(f"{ph} {100 * p['median']:+.1f}% [{100 * p['q1']:+.1f}, {100 * p['q3']:+.1f}]"
                      for ph, p in zip(phases, pairs)) + " (median [quartiles])")
    if report["lookup_p50_ms"] is not None:
        print(f"  lookups: p50 {report['lookup_p50_ms']:.1f} ms, p99 {report['lookup_p99_ms']:.1f} ms, "
              f"dedup ratio {report['dedup_ratio']:.2f}")
    c = report.get("cache")
    if c:
        print(f"  agent's row cache ({c['policy']}, {c['capacity_rows']:,} rows, {c['bytes'] / 2**20:.0f} MiB): "
              f"hit rate {100 * (c['hit_rate'] or 0):.1f}%, fill {100 * c['fill']:.0f}%, "
              f"{c['evictions']:,} evictions; {report['wire']['bytes_received'] / 2**20:.1f} MiB over gRPC, "
              f"{report['wire']['bytes_saved'] / 2**20:.1f} MiB served from the cache")
    print("  where a run's time goes (mean seconds per run; wait = blocked for rows (in-process: the gather), "
          "stage = the rest of taking them; off-cpu = asleep, inside the others; mem-busy = the memory cores' "
          "busy seconds, every process on them):")
    print(f"    {'phase:mode':<20} {'total':>7} {'compute':>8} {'hash':>7} {'issue':>7} {'wait':>7} {'stage':>7} "
          f"{'off-cpu':>7} {'mem-busy':>8}")
    for key, b in report["breakdown"].items():
        print(f"    {key:<20} {b['total_s']:>7.3f} {b['compute_s']:>8.3f} {b['hash_s']:>7.3f} "
              f"{b['issue_s']:>7.3f} {b['wait_s']:>7.3f} {b['stage_s']:>7.3f} {b['off_cpu_s']:>7.3f} "
              + (f"{b['memory_busy_s']:>8.3f}" if "memory_busy_s" in b else f"{'n/a':>8}"))
    pl = report["per_lookup"]
    if pl:
        io = ", ".join(f"{k} {v:.2f}" for k, v in pl["client_io_ms"].items())
        where = ("the agent's client (its I/O thread, or a connection's thread for direct lookups)"
                 if pl.get("lookups_direct") else
                 "the agent's client I/O thread" if report["memory"]["via"] == "agent" else "the client's I/O thread")
        print(f"  per lookup, on {where} (ms): {io}; {pl['rpcs_per_lookup']:.1f} RPCs, "
              f"shard handler {pl['server_handler_ms_per_rpc']:.2f} ms each"
              + (f"; {pl['lookups_direct']:,} of {pl['lookups']:,} answered directly "
                 f"({pl.get('lookups_streamed', 0):,} on a LookupStream, {pl['lookups_direct_failed']:,} fell back)"
                 if pl.get("lookups_direct") else ""))
    fc = report.get("fetch_cost")
    if fc:
        print(f"  model thread per fetch through the agent ({fc['layers']} layers x {fc['ids_per_layer']} ids): "
              f"issue {fc['issue_us']['median']:.0f} us + read {fc['ready_us']['median']:.0f} us = "
              f"{fc['total_us']['median']:.0f} us median ({fc['total_us']['p90']:.0f} us p90)"
              + (f"; rows in by {1e3 * fc['gap_s']:.0f} ms: {100 * fc['in_by_gap']:.0f} % of fetches"
                 if "in_by_gap" in fc else ""))
    if report["profile_top"]:
        print("  cProfile of one remote run, model thread, top functions by own time:")
        top = [r for r in report["profile_top"] if not r.get("path")]
        path = [r for r in report["profile_top"] if r.get("path")]
        for r in top[:12]:
            print(f"    {r['own_s']:>7.3f} s own {r['cumulative_s']:>7.3f} s cum {r['calls']:>7} calls  "
                  f"{r['function']}")
        if path:
            print("  ... and the memory path (remote memory, agent client) by cumulative time:")
            for r in path[:8]:
                print(f"    {r['own_s']:>7.3f} s own {r['cumulative_s']:>7.3f} s cum {r['calls']:>7} calls  "
                      f"{r['function']}")
    tr = report.get("trace")
    if tr:
        print(f"  torch.profiler, one {tr['phase']} run per mode (wall ms, device busy ms, device idle share; "
              "the host's blocking CUDA calls):")
        for mode, t in tr["modes"].items():
            busy = "-" if t["device_busy_ms"] is None else f"{t['device_busy_ms']:.1f}"
            idle = "-" if t["device_idle_share"] is None else f"{100 * t['device_idle_share']:.0f}%"
            blocking = ", ".join(f"{c['call']} x{c['calls']} {c['host_ms']:.1f} ms"
                                 for c in t["runtime_calls"] if c["blocking"]) or "none"
            print(f"    {mode:<12} {t['wall_ms']:>9.1f} {busy:>9} {idle:>5}  {blocking}")


def _cmd_bench_load(args: argparse.Namespace) -> int:
    from ..bench import load as bench_load
    from ..bench.common import write_report
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    report = bench_load.run(cfg, vocab, ids=args.ids, batch=args.batch, concurrency=args.concurrency,
                            shards=args.shards, progress=True)
    report["source"] = source
    write_report(report, args.out)
    m = report["memory"]
    print(f"load ({source}, {args.shards} shards; {report['machine']['cpu']}, {report['machine']['cores']} cores): "
          f"{report['lookups']:,} lookups of {args.batch} ids ({report['ids']:,} ids) at concurrency "
          f"{args.concurrency} in {report['seconds']:.1f} s")
    print(f"  {report['lookups_per_s']:,.0f} lookups/s, {report['ids_per_s']:,.0f} ids/s; latency p50 "
          f"{report['latency_p50_ms']:.2f} ms, p99 {report['latency_p99_ms']:.2f} ms")
    print(f"  errors {report['errors']}, retries {report['retries']}; memory growth after warm-up: client "
          f"{100 * m['client_rss_growth']:+.1f} %, shards (worst) {100 * m['shard_rss_growth']:+.1f} %")

    def plot(png):
        from ..bench.plot import plot_load
        plot_load(report, png)
    _plot_beside(args.out, plot)
    return 0 if report["errors"] == 0 else 1


def _cmd_bench_recovery(args: argparse.Namespace) -> int:
    from ..bench import recovery as bench_recovery
    from ..bench.common import write_report
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    report = bench_recovery.run(cfg, vocab, replica_counts=args.replicas, shards=args.shards, progress=True)
    report["source"] = source
    write_report(report, args.out)
    print(f"recovery of a killed shard copy ({source}, {args.shards} shards; {report['machine']['cpu']}, "
          f"{report['machine']['cores']} cores)")
    print(f"  {'copies':>6} {'shard MiB':>9} {'checkpoint s':>12} {'1st lookup s':>12} {'serving s':>9} "
          f"{'reload s':>8} {'stream lookups':>14} {'failed':>6}  rows from")
    for r in report["results"]:
        print(f"  {r['replicas']:>6} {r['shard_mib']:>9.1f} {r['checkpoint_s']:>12.3f} "
              f"{r['first_lookup_after_kill_s']:>12.3f} {r['copy_serving_again_s']:>9.3f} {r['reload_s']:>8.3f} "
              f"{r['stream_lookups_during']:>14,} {r['stream_failures']:>6}  {r['rows_from']}")
    return 0


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from ..bench import latency as bench_latency
    from ..bench.common import write_report
    from ..bench.plot import plot_latency
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    if args.storage == "mmap":
        return _latency_mapped(args, cfg, source, vocab)
    report = bench_latency.run(cfg, vocab, sizes_gib=args.sizes, shards=args.shards, batch=args.batch,
                               calls=args.calls, progress=True)
    report["source"] = source
    write_report(report, args.out)
    print(f"Lookup latency vs resident size ({source} layout, {args.shards} shards, {args.batch:,} random rows "
          f"per lookup, {args.calls} lookups per size; {report['machine']['cpu']}, {report['machine']['cores']} cores)")
    print(f"  {'resident GiB':>12} {'p50 ms':>8} {'p99 ms':>8}")
    for r in report["results"]:
        print(f"  {r['resident_gib']:>12.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    _plot_beside(args.out, lambda png: plot_latency(report, png))
    return 0


def _latency_mapped(args: argparse.Namespace, cfg: Any, source: str, vocab: Any) -> int:
    import shutil
    import tempfile

    from ..bench import latency as bench_latency
    from ..bench.common import write_report
    from ..bench.plot import plot_latency_mapped

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="engram-latency-mmap-")
    try:
        report = bench_latency.run_mapped(cfg, vocab, data_dir, sizes_gib=args.sizes, batch=args.batch,
                                          calls=args.calls, progress=True)
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["source"] = source
    write_report(report, args.out)
    print(f"Gather latency of a memory-mapped shard vs table size ({source} geometry, {args.batch:,} random rows "
          f"per lookup, {args.calls} lookups per size and kind; {report['machine']['cpu']}, "
          f"{report['machine']['cores']} cores; cold = pages evicted before each lookup)")
    print(f"  {'table GiB':>10} {'warm p50':>9} {'warm p99':>9} {'cold p50':>9} {'cold p99':>9}  (ms)")
    for r in report["results"]:
        print(f"  {r['table_gib']:>10.2f} {r['warm_p50_ms']:>9.2f} {r['warm_p99_ms']:>9.2f} "
              f"{r['cold_p50_ms']:>9.2f} {r['cold_p99_ms']:>9.2f}")
    _plot_beside(args.out, lambda png: plot_latency_mapped(report, png))
    return 0


def _cmd_bench_agent_hop(args: argparse.Namespace) -> int:
    from ..bench import agent_hop
    from ..bench.common import write_report

    layout, source = table_layout(args)
    report = agent_hop.run(layout, source, sizes=args.ids, shards=args.shards, calls=args.calls,
                           agent_cores=args.agent_cores, max_resident_gib=args.max_resident_gib, progress=True)
    write_report(report, args.out)
    print(f"Lookup round trip, in-process client vs the lookup agent ({source}, {args.shards} shards, "
          f"{args.calls} interleaved calls per size;")
    print(f"  cores {report['cores']}; {report['machine']['cpu']})")
    print(f"  {'ids':>7} {'client p50':>11} {'agent p50':>10} {'client p90':>11} {'agent p90':>10} "
          f"{'agent +':>9}  (ms)")
    for r in report["results"]:
        print(f"  {r['ids']:>7,} {r['client_p50_ms']:>11.3f} {r['agent_p50_ms']:>10.3f} "
              f"{r['client_p90_ms']:>11.3f} {r['agent_p90_ms']:>10.3f} {r['agent_extra_ms']:>+9.3f}")
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from ..bench.report import write_results

    path = write_results(args.results, args.out)
    print(f"wrote {path}")
    return 0


def _add_hash(bsub) -> None:
    b = bsub.add_parser("hash", help="tokens/s of the n-gram hasher vs the reference's loop",
                        description="Hashing throughput at prefill and decode shapes, "
                                    "interleaved with the reference algorithm.")
    add_table_args(b, "paper_27b")
    b.add_argument("--repeats", type=int, default=7, help="timed repetitions, median quoted (default: 7)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_hash)


def _add_lookup(bsub) -> None:
    b = bsub.add_parser("lookup", help="rows/s and GB/s through the client vs an in-process gather",
                        description="Deploy the memory service on a local Ray with each shard count "
                                    "and time client lookups against gathering the same rows in-process.")
    add_table_args(b, "demo")
    b.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts (default: 1 2)")
    b.add_argument("--batch", type=int, nargs="+", default=[1024, 16384, 131072],
                   help="distinct rows per lookup (default: 1024 16384 131072)")
    b.add_argument("--dtype", default="float32", choices=STORE_DTYPES)
    b.add_argument("--repeats", type=int, default=7, help="timed repetitions, median quoted (default: 7)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_lookup)


def _add_offload(bsub) -> None:
    b = bsub.add_parser("offload", help="throughput with no Engram / table in-process / remote with "
                                        "prefetch / remote on demand: prefill, decode and serving, interleaved",
                        description="What the Engram table costs by where it lives; the 100B layout "
                                    "with a resident cap where RAM cannot hold it. The model computes "
                                    "on its own cores, the memory side on the others (--no-isolate: shared).")
    add_table_args(b, "table_100b")
    b.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS),
                   help="backbone preset, deepened to hold the table's Engram layers (default: demo; "
                        "dense_1b for a GPU)")
    b.add_argument("--dtype", default="float32", choices=sorted({*STORE_DTYPES, *DTYPE_ALIASES}),
                   help="backbone compute dtype (default: float32; bfloat16 on a GPU)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--max-resident-gib", type=float, default=1.0,
                   help="RAM for the table's rows in all (rows map into it; default: 1.0); 0: no cap, "
                        "for a cluster whose memory nodes hold the whole table (and a worker that "
                        "holds it for the in-process mode)")
    b.add_argument("--memory-at", metavar="HOST:PORT[,HOST:PORT...]",
                   help="use shards that already serve there (one per shard, in order; e.g. started by "
                        "'engram-ray shard'), no Ray; --shards and --max-resident-gib do not apply")
    b.add_argument("--token-file", help="with --memory-at: the shards' client token")
    b.add_argument("--via", default="agent", choices=["client", "agent"],
                   help="how the remote modes reach the shards: the node-local lookup agent (rows through "
                        "shared memory; default), or an EngramClient in the model's process")
    b.add_argument("--agent-spin-ms", type=float, default=None, metavar="MS",
                   help="--via agent: how long the model thread polls the agent's socket for its rows before "
                        "it sleeps (default: the client's, 0: sleep at once)")
    b.add_argument("--lookup-streams", type=int, default=None, metavar="N",
                   help="the deployed shards' max_lookup_streams (default: the service's, 16); 0: they refuse "
                        "LookupStream, so the agent's direct lookups are one call each (for an A/B)")
    add_cache_args(b.add_argument_group("the lookup agent's hot-row cache (remote modes, --via agent)"))
    g = b.add_argument_group("prefill and decode phases")
    g.add_argument("--sequences", type=int, default=16, help="prefill sequences (paper: 512)")
    g.add_argument("--min-len", type=int, default=32, help="shortest sequence (paper: 100)")
    g.add_argument("--max-len", type=int, default=192, help="longest sequence (paper: 1024)")
    g.add_argument("--decode-batch", type=int, default=8)
    g.add_argument("--decode-tokens", type=int, default=16)
    g.add_argument("--microbatches", type=int, default=1,
                   help="also run decode as this many alternating micro-batches (phase decode_mbM), so one "
                        "part's rows travel while the other computes; 1: off (default: 1)")
    g = b.add_argument_group("serving phase (continuous batching)")
    g.add_argument("--requests", type=int, default=16, help="requests served (paper: 512)")
    g.add_argument("--prompt-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"),
                   help="prompt lengths ~ Uniform(MIN, MAX) (default: 32 128; paper: 100 1024)")
    g.add_argument("--output-len", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"),
                   help="output lengths ~ Uniform(MIN, MAX) (default: 8 32; paper: 100 1024)")
    g.add_argument("--max-batch", type=int, default=8, help="live sequences at most (default: 8)")
    g.add_argument("--token-budget", type=int, default=256,
                   help="prompt tokens prefilled per step, in chunks (default: 256)")
    b.add_argument("--repeats", type=int, default=5, help="timed repetitions of a b c d, median quoted "
                                                          "with min/quartiles/max (default: 5)")
    b.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N] (default: auto)")
    b.add_argument("--no-isolate", action="store_true",
                   help="do not pin: model, shards, client and Ray share every core")
    b.add_argument("--memory-cores", type=int, help="cores for the memory side (default: a quarter, at least 1)")
    b.add_argument("--profile", action="store_true",
                   help="after the timed runs, run remote mode once more under cProfile and report "
                        "the top functions (model thread)")
    b.add_argument("--trace", nargs="?", const="decode", default="", metavar="PHASE",
                   help="after the timed runs, run one phase (prefill, decode or serving; default: "
                        "decode) of each mode once under torch.profiler: the device's busy time "
                        "against the wall time, its top kernels, and the CUDA runtime calls by host "
                        "time (what makes a GPU idle or the host block). Tracing costs seconds per "
                        "10^5 traced events: a serving run of a 1B backbone is ~10^6")
    b.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.png")
    b.set_defaults(func=_cmd_bench_offload)


def _add_load(bsub) -> None:
    b = bsub.add_parser("load", help="many lookups at a fixed concurrency: errors and memory over time",
                        description="Deploy the service on a local Ray and run lookups of random rows "
                                    "with CONCURRENCY in flight; report errors, throughput, latency and "
                                    "the RSS of the client and every shard as it runs (exit 1 on any error).")
    add_table_args(b, "demo")
    b.add_argument("--ids", type=int, default=1_000_000, help="row ids looked up in all (default: 1000000)")
    b.add_argument("--batch", type=int, default=256, help="ids per lookup (default: 256)")
    b.add_argument("--concurrency", type=int, default=32, help="lookups in flight (default: 32)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.png")
    b.set_defaults(func=_cmd_bench_load)


def _add_recovery(bsub) -> None:
    b = bsub.add_parser("recovery", help="time for a killed shard copy to serve again, and failed lookups "
                                         "meanwhile, with 1 and 2 copies per shard",
                        description="Deploy with a recovery checkpoint dir, push, checkpoint, kill shard 0's "
                                    "first copy during a stream of lookups; time its return.")
    add_table_args(b, "demo")
    b.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="copies per shard (default: 1 2)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_recovery)


def _add_latency_vs_size(bsub) -> None:
    b = bsub.add_parser("latency-vs-size", help="p50/p99 lookup latency as the table grows (O(1) claim)",
                        description="Deploy the table with growing resident sizes and time lookups "
                                    "of random rows.")
    add_table_args(b, "table_100b")
    b.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0],
                   help="resident sizes in GiB (default: 0.1 0.25 0.5 1 2; go as large as RAM allows)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--batch", type=int, default=4096, help="rows per lookup (default: 4096)")
    b.add_argument("--calls", type=int, default=50, help="lookups per size (default: 50)")
    b.add_argument("--storage", default="ram", choices=["ram", "mmap"],
                   help="ram: deployed shards with a resident cap (default); mmap: one memory-mapped shard "
                        "of each size on disk, in this process, timed with its pages warm and evicted (cold)")
    b.add_argument("--data-dir", metavar="DIR", help="--storage mmap: where the tables go (default: a temporary "
                                                     "directory, removed after)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.png")
    b.set_defaults(func=_cmd_bench_latency)


def _add_agent_hop(bsub) -> None:
    b = bsub.add_parser("agent-hop", help="what the lookup agent adds to a lookup's round trip",
                        description="Start plain shards and a lookup agent, and time lookups through an "
                                    "in-process EngramClient and through the agent, interleaved, per size. "
                                    "Shards (and by default the agent) run on the memory cores, the worker "
                                    "on the first core.")
    add_table_args(b, "table_100b")
    b.add_argument("--ids", type=int, nargs="+", default=[128, 2048, 16384], help="ids per lookup (default: "
                                                                                  "128 2048 16384)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--calls", type=int, default=200, help="round trips per size and path (default: 200)")
    b.add_argument("--agent-cores", default="memory", choices=["memory", "worker"],
                   help="memory: the agent shares the shards' cores (default); worker: the worker's core, "
                        "which it has to itself while the worker waits")
    b.add_argument("--max-resident-gib", type=float, default=1.0,
                   help="RAM for the table's rows in all; rows map into it (default: 1)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_agent_hop)


def _cmd_bench_cache(args: argparse.Namespace) -> int:
    from ..bench import cache as bench_cache
    from ..bench.common import write_report
    from ..bench.plot import plot_cache
    from ..config import preset
    from ..core.indexer import RowIndexer
    from ..data import default_vocab, load_corpus, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    vocab = default_vocab(tok)
    runs = []
    for corpus in args.corpora:
        tokens = load_corpus(corpus, tok, progress=True).train[:args.tokens]
        for name in args.presets:
            runs.append(bench_cache.run(RowIndexer.build(preset(name), vocab), tokens, corpus=corpus, preset=name,
                                        sizes=args.sizes, policies=args.policies, batch=args.batch,
                                        seq_len=args.seq_len, progress=True))
    report = {"benchmark": "cache", "runs": runs,
              "statistic": f"hit rate over the steps after the first {100 * 0.25:g} % (warm-up)"}
    write_report(report, args.out)
    for r in runs:
        print(f"{r['corpus']} on {r['preset']} ({r['table_rows']:,} rows, {r['tokens']:,} tokens in steps of "
              f"{r['batch']} x {r['seq_len']}): Zipf s = {r['zipf_exponent']:.2f}, top 1 % of rows read get "
              f"{100 * r['top1pct_share']:.0f} % of reads, {100 * r['utilisation']:.3f} % of rows read; "
              f"ceiling {100 * r['hit_rate_ceiling']:.1f} %")
        for c in r["curves"]:
            print(f"  cache {100 * c['share']:g} % ({c['capacity_rows']:,} rows) {c['policy']:<8} "
                  f"hit rate {100 * c['hit_rate']:.1f} %")
        for t in r["tables"]:
            print(f"  layer {t['layer']} {t['order']}-grams: {t['touched']:,} of {t['rows']:,} rows read "
                  f"({100 * t['utilisation']:.3f} %; HyperLogLog {t['touched_hll']:,.0f})")
    _plot_beside(args.out, lambda png: plot_cache(report, png))
    return 0


def _add_cache(bsub) -> None:
    b = bsub.add_parser("cache", help="hit rate of the lookup agent's row cache against its size, on real "
                                      "text; Zipf fit and table utilisation",
                        description="Replay the lookups a node's agent sees while a corpus is trained on "
                                    "(real hashing, one lookup per Engram layer per step, deduplicated) "
                                    "through the agent's RowCache at several sizes and policies.")
    add_tokenizer_arg(b)
    b.add_argument("--corpora", nargs="+", default=["stdlib", "shakespeare"],
                   help="corpora to stream (default: stdlib shakespeare; a file or folder of text works too)")
    b.add_argument("--presets", nargs="+", default=["demo", "table_100b"], choices=sorted(PRESETS),
                   help="table layouts (default: demo table_100b)")
    b.add_argument("--sizes", type=float, nargs="+", default=[0.0001, 0.001, 0.01, 0.05, 0.2],
                   help="cache sizes as shares of the table's rows (default: 0.0001 0.001 0.01 0.05 0.2)")
    b.add_argument("--policies", nargs="+", default=["lru", "tinylfu"], choices=["lru", "tinylfu"])
    b.add_argument("--tokens", type=int, default=400_000, help="tokens of each corpus streamed (default: 400000)")
    b.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    b.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.png")
    b.set_defaults(func=_cmd_bench_cache)


def _add_report(bsub) -> None:
    b = bsub.add_parser("report", help="render the results page (Markdown) from benchmark JSON files",
                        description="Regenerate docs/RESULTS.md from results/*.json: no figure is typed by hand.")
    b.add_argument("--results", default="results", help="folder of benchmark JSON + PNG (default: results)")
    b.add_argument("--out", default="docs/RESULTS.md", help="Markdown to write (default: docs/RESULTS.md)")
    b.set_defaults(func=_cmd_bench_report)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, JSON (+ PNG) out: hash, lookup, offload, load, "
                                     "recovery, latency-vs-size, cache, agent-hop, interference, overlap, report",
                       description="Benchmarks. Each writes JSON with --out.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    _add_hash(bsub)
    _add_lookup(bsub)
    _add_offload(bsub)
    _add_cache(bsub)
    _add_load(bsub)
    _add_recovery(bsub)
    _add_latency_vs_size(bsub)
    _add_agent_hop(bsub)
    interference.add(bsub)
    overlap.add(bsub)
    _add_report(bsub)
