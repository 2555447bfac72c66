"""Which table rows does a text read, and which shard holds them?

Runs offline in a second: GPT-2 tokenizer -> compressed ids -> exact Engram n-gram hashes ->
global row ids -> shard and local row under a 4-shard plan. Decoding one token at a time
reads the very same rows.

    python examples/hash_and_place.py "Only Alexander the Great could tame the horse Bucephalus."
"""

import sys

import numpy as np

from engram_ray import config
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.layout import ShardPlan
from engram_ray.data import default_vocab, load_tokenizer


def main(text: str, num_shards: int = 4) -> None:
    cfg = config.paper_27b()
    tok = load_tokenizer()
    vocab = default_vocab(tok)
    indexer = RowIndexer.build(cfg, vocab)  # compress -> hash -> offset into the global rows
    layout = indexer.layout
    plan = ShardPlan(layout.total_rows, num_shards)

    ids_bt = np.array([tok.encode(text, add_special_tokens=False).ids])
    rows_lbth = indexer.rows(ids_bt)  # [L, B, T, H]
    shard, local = plan.locate(rows_lbth)

    print(f"{layout.num_params / 1e9:.2f}B-parameter table ({layout.fingerprint}), "
          f"{num_shards} shards; {ids_bt.size} tokens x {len(cfg.layer_ids)} layers x "
          f"{layout.num_heads} heads = {rows_lbth.size} row lookups")
    for t, tid in enumerate(ids_bt[0]):
        first = rows_lbth[0, 0, t, 0]
        print(f"  {tok.decode([int(tid)])!r:>14}  layer {cfg.layer_ids[0]} head 0 -> row {first:>11,} "
              f"(shard {shard[0, 0, t, 0]}, local row {local[0, 0, t, 0]:,})")
    per_shard = np.bincount(shard.ravel(), minlength=num_shards)
    print("  lookups per shard:", per_shard.tolist())

    # Decoding token by token reads the same rows as hashing the whole text at once.
    hist = indexer.new_history(1)
    for t in range(ids_bt.shape[1]):
        step_lbth, hist = indexer.step(hist, ids_bt[:, t:t + 1])   # [L, 1, 1, H]
        assert np.array_equal(step_lbth[:, :, 0], rows_lbth[:, :, t])
    print("  incremental decoding reads the same rows: yes")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "Only Alexander the Great could tame the horse Bucephalus.")
