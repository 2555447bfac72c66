"""Deploy a small memory service on a local Ray, prefetch the rows a batch of real text needs,
do other work while they travel, then use them; push gradients back like a training step.

    python examples/deploy_and_prefetch.py

Runs offline on one machine (Ray starts in-process); on a cluster, call
``ray.init(address="auto")`` first and the shards go to the memory nodes.
"""

import time

import numpy as np
import ray

from engram_ray import config
from engram_ray.core.indexer import RowIndexer
from engram_ray.data import default_vocab, load_corpus, load_tokenizer
from engram_ray.runtime import deploy


def main() -> None:
    cfg = config.demo()
    tok = load_tokenizer()
    vocab = default_vocab(tok)
    ray.init(include_dashboard=False, log_to_driver=False)
    svc = deploy(cfg, vocab=vocab, num_shards=2, name="example")
    try:
        print(f"service {svc.name!r}: {svc.num_shards} shards at {', '.join(svc.addresses)}; "
              f"{svc.layout.total_rows:,} rows x {svc.layout.row_dim}")
        indexer = RowIndexer.build(cfg, vocab, layout=svc.layout)   # tokens -> the service's rows
        corpus = load_corpus("stdlib", tok)
        batch_bt = corpus.val[:8 * 256].astype(np.int64).reshape(8, 256)       # [B=8, T=256]
        rows_lbth = indexer.rows(batch_bt)                                      # [L, B, T, H]

        with svc.client() as client:
            t0 = time.perf_counter()
            pending = client.prefetch(rows_lbth)          # returns at once: the rows are in flight
            issued = time.perf_counter() - t0
            busy = sum(i * i for i in range(200_000))     # ... the model's first block would run here
            emb = pending.result()                        # [L, B, T, H, row_dim]
            print(f"prefetch issued in {1e3 * issued:.2f} ms; rows arrived after "
                  f"{1e3 * pending.fetch_seconds:.1f} ms: {emb.shape} {emb.dtype}")

            grads = np.random.default_rng(0).normal(size=emb.shape).astype(np.float32) * 1e-3
            updated = client.push_gradients(rows_lbth, grads)
            s = client.stats()
            print(f"pushed gradients to {updated:,} distinct rows; {s['ids']:,} ids looked up, "
                  f"{s['unique_ids']:,} unique (dedup ratio {s['dedup_ratio']:.2f}), "
                  f"{s['bytes_received'] / 2**20:.1f} MiB received")
        for d in svc.describe():
            c = d["counters"]
            print(f"  shard {d['shard_index']}: {c['rows_served']:,} rows served, {c['rows_updated']:,} rows updated")
        assert busy > 0
    finally:
        svc.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
