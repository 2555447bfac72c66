"""``engram-ray bench lookup``: rows/s and GB/s through :class:`EngramClient` against an
in-process gather of the same rows (the physical limit on this machine), for several shard
counts and batch sizes. Timings are interleaved (client, local, client, local, ...) and the
median is quoted, so drift on a shared machine biases neither side."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import EngramConfig, StoreConfig
from ..store import TableShard


def run(config: EngramConfig, vocab: Any, *, shard_counts: Sequence[int] = (1, 2),
        batch_sizes: Sequence[int] = (1024, 16384, 131072), repeats: int = 7,
        store: StoreConfig = StoreConfig(), progress: bool = False) -> dict[str, Any]:
    from ..runtime import ray_session

    with ray_session():
        return _run(config, vocab, shard_counts, batch_sizes, repeats, store, progress)


def _run(config, vocab, shard_counts, batch_sizes, repeats, store, progress) -> dict[str, Any]:
    from ..runtime import deploy

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(shard_counts) * len(batch_sizes) * repeats, desc="bench lookup", unit="rep")
    rows_out = []
    try:
        local = None
        for S in shard_counts:
            svc = deploy(config, vocab=vocab, num_shards=S, store=store, name=f"bench-lookup-{S}")
            try:
                if local is None:
                    local = TableShard.create(svc.layout, 1, 0, store)
                row_bytes = local.row_bytes
                with svc.client() as client:
                    rng = np.random.default_rng(0)
                    for n in batch_sizes:
                        # distinct ids, as a client sends after deduplication
                        ids = np.sort(rng.choice(svc.layout.total_rows, size=min(n, svc.layout.total_rows),
                                                 replace=False))
                        out = np.empty((ids.size, local.width), local.dtype)  # as stored (FP8: packed)
                        client.lookup(ids)
                        local.gather(ids, out=out)
                        t_client, t_local = [], []
                        for _ in range(repeats):
                            t0 = time.perf_counter()
                            got = client.lookup(ids)
                            t_client.append(time.perf_counter() - t0)
                            t0 = time.perf_counter()
                            local.gather(ids, out=out)
                            t_local.append(time.perf_counter() - t0)
                            if bar is not None:
                                bar.update(1)
                        assert np.array_equal(got, out)
                        mc, ml = float(np.median(t_client)), float(np.median(t_local))
                        rows_out.append({
                            "shards": S, "rows": int(ids.size), "bytes": int(ids.size * row_bytes),
                            "client_s": mc, "local_s": ml,
                            "client_rows_per_s": ids.size / mc, "local_rows_per_s": ids.size / ml,
                            "client_gb_per_s": ids.size * row_bytes / mc / 1e9,
                            "local_gb_per_s": ids.size * row_bytes / ml / 1e9,
                            "client_over_local": mc / ml,
                            "client_p50_ms": 1e3 * float(np.percentile(t_client, 50)),
                            "client_p99_ms": 1e3 * float(np.percentile(t_client, 99))})
            finally:
                svc.shutdown()
    finally:
        if bar is not None:
            bar.close()
    return {"benchmark": "lookup", "config": config.to_dict(), "store": store.to_dict(),
            "table_rows": int(local.num_rows) if local is not None else None,
            "row_bytes": int(local.row_bytes) if local is not None else None,
            "repeats": repeats, "statistic": "median",
            "transport": "gRPC over loopback to Ray actor processes on this machine",
            "results": rows_out}
