"""``engram-ray layout``, ``params`` and ``hash``: look at a table (and what it adds to a
model) before deploying it."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import MODEL_PRESETS, PRESETS
from .common import add_table_args, engram_config, gib


def _cmd_params(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import model_preset
    from ..model.params import count_params

    ecfg = None if args.preset == "none" and not args.config else engram_config(args)[0]
    mcfg = model_preset(args.model)
    layers = args.layers if args.layers is not None else max(mcfg.n_layers, max(ecfg.layer_ids) + 1 if ecfg else 0)
    mcfg = dataclasses.replace(mcfg, n_layers=layers)
    pc = count_params(mcfg, ecfg)
    if args.json:
        print(json.dumps({"model": mcfg.to_dict(), "engram": ecfg.to_dict() if ecfg else None, **pc.to_dict()},
                         indent=2))
        return 0
    what = f"{args.model} backbone ({layers} layers)" + (f" + Engram {args.config or args.preset}" if ecfg else "")
    print(f"Parameters of {what}")
    for name, n in (("total", pc.total), ("activated per token", pc.activated), ("sparse (inactive)", pc.sparse),
                    ("  routed experts, inactive", pc.routed_inactive), ("  table rows, not read", pc.table -
                                                                         pc.table_activated),
                    ("backbone (dense)", pc.backbone), ("routed experts, all", pc.routed_experts),
                    ("Engram layers", pc.engram_layers), ("Engram table", pc.table)):
        print(f"  {name:<28} {n:>18,}  ({n / 1e6:,.2f} M)")
    print(f"  rho (sparse share in experts) {'-' if pc.rho is None else f'{pc.rho:.4f}':>17}")
    return 0


def _cmd_layout(args: argparse.Namespace) -> int:
    from ..core.layout import ShardPlan, TableLayout
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    vocab = default_vocab(load_tokenizer(args.tokenizer))
    layout = TableLayout.build(cfg, vocab)
    plan = ShardPlan(layout.total_rows, args.shards)
    info = layout.summary()
    info["source"] = source
    info["tokenizer"] = {"name": args.tokenizer, "tokens": vocab.num_tokens,
                         "compressed": vocab.size, "ratio": round(vocab.ratio, 4)}
    info["shards"] = [{"shard": s, "rows": list(plan.shard_range(s)),
                       "bytes": {d: (plan.shard_range(s)[1] - plan.shard_range(s)[0]) * layout.row_bytes(d)
                                 for d in layout.storage_dtypes()}}
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
    print("  size          " + "   ".join(f"{d} {gib(layout.nbytes(d))}" for d in layout.storage_dtypes()))
    print(f"  vocabulary    {vocab.num_tokens:,} tokens -> {vocab.size:,} compressed "
          f"({100 * vocab.ratio:.1f} %), digest {vocab.digest}")
    for li, layer in enumerate(layout.layer_ids):
        sizes = layout.head_sizes[li]
        print(f"  layer {layer:<3} primes {sizes[0]:,} .. {sizes[-1]:,}   rows from {int(layout.offsets[li, 0]):,}")
    print(f"  shards        {plan.num_shards} (--shards):")
    for s in info["shards"]:
        lo, hi = s["rows"]
        print(f"    shard {s['shard']:<3} rows [{lo:,}, {hi:,})  "
              + "  ".join(f"{d} {gib(b)}" for d, b in s["bytes"].items()))
    return 0


def _cmd_hash(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.indexer import RowIndexer
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    tok = load_tokenizer(args.tokenizer)
    vocab = default_vocab(tok)
    indexer = RowIndexer.build(cfg, vocab)
    layout = indexer.layout
    enc = tok.encode(args.text, add_special_tokens=False)
    if not enc.ids:
        print("engram-ray hash: the text encodes to no tokens", file=sys.stderr)
        return 2
    ids = np.array([enc.ids], dtype=np.int64)
    comp = vocab(ids)  # shown beside the rows
    rows = dict(zip(layout.layer_ids, indexer.rows(ids)[:, 0]))  # {layer: [T, H]}
    if args.json:
        print(json.dumps({"fingerprint": layout.fingerprint, "tokens": enc.tokens,
                          "token_ids": ids[0].tolist(), "compressed_ids": comp[0].tolist(),
                          "row_ids": {str(k): v.tolist() for k, v in rows.items()}}, indent=2))
        return 0
    print(f"{source}: {len(enc.ids)} tokens, fingerprint {layout.fingerprint}")
    for layer in layout.layer_ids:
        print(f"layer {layer}: global row ids (orders 2..{cfg.max_ngram_size} x {cfg.n_head_per_ngram} heads)")
        for t, (tid, cid) in enumerate(zip(enc.ids, comp[0].tolist())):
            piece = tok.decode([tid])
            shown = " ".join(str(r) for r in rows[layer][t][: args.max_heads])
            more = " ..." if rows[layer].shape[1] > args.max_heads else ""
            print(f"  {piece!r:>14} {tid:>6} -> {cid:>6} | {shown}{more}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("layout", help="print a table's layout: rows, parameters, GiB per dtype, "
                                      "fingerprint, shard ranges",
                       description="Show what a table config costs before deploying it.")
    add_table_args(p, "paper_27b")
    p.add_argument("--shards", type=int, default=1, help="split into this many shards (default: 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_layout)

    p = sub.add_parser("params", help="parameter accounting of a backbone + Engram table: total, activated "
                                      "per token, sparse, and rho (the sparse share in routed experts)",
                       description="Count an Engram-MoE's parameters as the paper's sparsity-allocation study "
                                   "does (exact: the model is built on the meta device).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="demo", choices=sorted(PRESETS) + ["none"],
                   help="Engram table preset, or none for the backbone alone (default: demo)")
    g.add_argument("--config", metavar="FILE.json", help="Engram config as JSON (keys = EngramConfig fields)")
    p.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS), help="backbone preset (default: demo)")
    p.add_argument("--layers", type=int, help="backbone layers (default: the preset's, deepened to hold the table's "
                                              "Engram layers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("hash", help="show the compressed ids and table rows a text looks up",
                       description="Hash a text with the exact Engram n-gram hash.")
    p.add_argument("text")
    add_table_args(p, "demo")
    p.add_argument("--max-heads", type=int, default=4, help="row ids shown per token (default: 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_hash)
