"""``engram-ray demo``: the main job on one machine."""

from __future__ import annotations

import argparse
import time

from ..config import preset
from .common import gib


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.hashing import NgramHasher
    from ..core.layout import TableLayout
    from ..data import default_vocab, load_corpus, load_tokenizer

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
          f"params ({gib(layout.nbytes('float32'))} fp32), fingerprint {layout.fingerprint}")
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


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job, on one machine with no cluster (today: the "
                                    "foundation; training through the service lands with issue #4)",
                       description="End-to-end demo on one machine.")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH")
    p.add_argument("--corpus", default="stdlib", metavar="stdlib|shakespeare|PATH",
                   help="training text (default: the CPython standard library)")
    p.set_defaults(func=_cmd_demo)
