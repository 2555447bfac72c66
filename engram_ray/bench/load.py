"""``engram-ray bench load``: many lookups at a fixed concurrency through one client, with the
shards' and the client's memory sampled as it runs: errors must stay 0 and memory flat.

``concurrency`` lookups are in flight at all times (each of ``batch`` random row ids, so
``ids / batch`` lookups in all); RSS is read from every shard's Describe and from this
process every ``sample_every`` lookups.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import EngramConfig, ServiceConfig, StoreConfig
from ..rpc.metrics import rss_bytes


def _drive(client: Any, layout: Any, calls: int, batch: int, concurrency: int, sample_every: int,
           bar: Any) -> tuple[int, float, list[dict[str, Any]]]:
    """``calls`` lookups of ``batch`` random rows, ``concurrency`` in flight (oldest first);
    RSS of the client and every shard sampled every ``sample_every``: (errors, seconds, samples)."""
    rng = np.random.default_rng(0)
    client.lookup(rng.integers(0, layout.total_rows, batch))  # warm the channels
    samples: list[dict[str, Any]] = []
    errors = done = issued = 0

    def sample() -> None:
        d = client.describe()
        samples.append({"lookups": done, "client_rss": rss_bytes(), "shard_rss": [s["rss_bytes"] for s in d]})

    sample()
    t0 = time.perf_counter()
    inflight: list = []
    while done < calls:
        while issued < calls and len(inflight) < concurrency:
            inflight.append(client.prefetch(rng.integers(0, layout.total_rows, batch)))
            issued += 1
        p = inflight.pop(0)  # oldest first: at most `concurrency` in flight
        try:
            rows = p.result(timeout=60)
            assert rows.shape == (batch, layout.row_dim)
        except Exception:  # noqa: BLE001 - counted: the test demands none
            errors += 1
        done += 1
        if bar is not None:
            bar.update(1)
        if done % sample_every == 0:
            sample()
    seconds = time.perf_counter() - t0
    sample()
    return errors, seconds, samples


def run(config: EngramConfig, vocab: Any, *, ids: int = 1_000_000, batch: int = 256, concurrency: int = 32,
        shards: int = 2, sample_every: int = 200, service: ServiceConfig = ServiceConfig(),
        progress: bool = False) -> dict[str, Any]:
    from ..runtime import deploy, ray_session

    if ids < 1 or batch < 1 or concurrency < 1:
        raise ValueError(f"ids={ids}, batch={batch}, concurrency={concurrency}: expected positive counts")
    calls = -(-ids // batch)
    with ray_session():
        svc = deploy(config, vocab=vocab, num_shards=shards, store=StoreConfig(), name="bench-load", service=service)
        try:
            with svc.client() as client:
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=calls, desc="bench load", unit="lookup")
                errors, seconds, samples = _drive(client, svc.layout, calls, batch, concurrency, sample_every, bar)
                if bar is not None:
                    bar.close()
                stats = client.stats()
        finally:
            svc.shutdown()
    steady = samples[len(samples) // 4:]  # after a quarter: allocator and caches warmed
    growth = {
        "client_rss_growth": steady[-1]["client_rss"] / steady[0]["client_rss"] - 1,
        "shard_rss_growth": max(b / a - 1 for a, b in zip(steady[0]["shard_rss"], steady[-1]["shard_rss"])),
    }
    return {"benchmark": "load", "ids": calls * batch, "lookups": calls, "batch": batch,
            "concurrency": concurrency, "shards": shards, "errors": errors, "client_errors": stats["errors"],
            "retries": stats["retries"], "seconds": seconds, "lookups_per_s": calls / seconds,
            "ids_per_s": calls * batch / seconds, "latency_p50_ms": stats["latency_p50_ms"],
            "latency_p99_ms": stats["latency_p99_ms"], "memory": growth, "samples": samples}
