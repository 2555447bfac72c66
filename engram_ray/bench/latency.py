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


def run_mapped(config: EngramConfig, vocab: Any, data_dir: str, *, sizes_gib: Sequence[float] = (0.25, 0.5, 1.0),
               batch: int = 4096, calls: int = 50, progress: bool = False) -> dict[str, Any]:
    """The mmap series: for each size, a table of about that many GiB of float32 rows in a
    memory-mapped file under ``data_dir`` (one shard, in this process: what the storage adds
    to a lookup, without the transport), timed gathering random rows with the file's pages
    warm (in the page cache) and cold (evicted before every lookup: every page read from disk,
    a table larger than any page cache). Sizes run one after another; warm and cold alternate."""
    from ..config import with_table_params
    from ..core.layout import TableLayout
    from ..store import TableShard
    from ..store.mapped import evict, mapped_stats

    store = StoreConfig(optimizer=OptimizerConfig(kind="none"), storage="mmap", data_dir=data_dir)
    rows_out = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sizes_gib) * calls, desc="bench latency-vs-size (mmap)", unit="call")
    for gib in sizes_gib:
        cfg = with_table_params(config, gib * 2**30 / 4)
        layout = TableLayout.build(cfg, vocab)
        shard = TableShard.create(layout, 1, 0, store)
        rng = np.random.default_rng(0)
        lat: dict[str, list[float]] = {"warm": [], "cold": []}
        shard.gather(rng.integers(0, layout.total_rows, size=batch))  # warm-up
        for _ in range(calls):
            for kind in ("warm", "cold"):
                ids = np.sort(rng.choice(layout.total_rows, size=batch, replace=False))
                if kind == "warm":
                    shard.gather(ids)  # the same rows, once, so their pages are in
                elif not evict(shard.values):
                    raise RuntimeError("bench latency-vs-size --storage mmap: cannot evict the mapped file")
                t0 = time.perf_counter()
                shard.gather(ids)
                lat[kind].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
        rows_out.append({"table_gib": layout.nbytes("float32") / 2**30, "rows": int(layout.total_rows),
                         **{f"{k}_{q}_ms": 1e3 * float(np.percentile(v, p)) for k, v in lat.items()
                            for q, p in (("p50", 50), ("p99", 99))},
                         "resident_after_bytes": mapped_stats(shard.values)["mapped_resident_bytes"]})
        del shard
    if bar is not None:
        bar.close()
    return {"benchmark": "latency-vs-size-mmap", "config": config.to_dict(), "batch_rows": batch,
            "calls_per_size": calls, "storage": "mmap", "results": rows_out,
            "note": "one shard in the benchmark's process (no gRPC): the storage's share of a lookup; "
                    "cold = the file's pages evicted (madvise + posix_fadvise) before each lookup"}
