"""``engram-ray bench latency-vs-size``: lookup latency as the table's resident size grows.

Engram's lookups are O(1) in the table size: a row id is a hash, a lookup a gather. Each
size deploys the 100B layout with that many GiB of rows resident (rows map into them) and
times lookups of random rows through the client: p50 and p99 should stay flat.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import EngramConfig, OptimizerConfig, StoreConfig


def run(config: EngramConfig, vocab: Any, *, sizes_gib: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0),
        shards: int = 2, batch: int = 4096, calls: int = 50, progress: bool = False) -> dict[str, Any]:
    from ..runtime import deploy, ray_session

    store = StoreConfig(optimizer=OptimizerConfig(kind="none"))
    rows_out = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sizes_gib) * calls, desc="bench latency-vs-size", unit="call")
    with ray_session():
        for gib in sizes_gib:
            svc = deploy(config, vocab=vocab, num_shards=shards, store=store, name="bench-latency",
                         max_resident_gib=gib)
            try:
                resident = sum(d["resident_rows"] for d in svc.describe())
                rng = np.random.default_rng(0)
                with svc.client() as client:
                    client.lookup(rng.integers(0, svc.layout.total_rows, size=batch))  # warm-up
                    lat = []
                    for _ in range(calls):
                        ids = np.sort(rng.choice(svc.layout.total_rows, size=batch, replace=False))
                        t0 = time.perf_counter()
                        client.lookup(ids)
                        lat.append(time.perf_counter() - t0)
                        if bar is not None:
                            bar.update(1)
                rows_out.append({"resident_gib": resident * svc.layout.row_bytes("float32") / 2**30,
                                 "resident_rows": resident, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                                 "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                                 "mean_ms": 1e3 * float(np.mean(lat))})
            finally:
                svc.shutdown()
    if bar is not None:
        bar.close()
    return {"benchmark": "latency-vs-size", "config": config.to_dict(), "shards": shards,
            "batch_rows": batch, "calls_per_size": calls, "logical_rows": int(svc.layout.total_rows),
            "row_bytes": int(svc.layout.row_bytes("float32")), "results": rows_out,
            "note": "sizes run one after another (each needs its own deployment), not interleaved"}
