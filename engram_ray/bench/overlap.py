"""``engram-ray bench overlap``: what a decode step's lookups cost the compute around them, on
this machine, by where the lookup's work runs.

Why: ``bench offload`` on one machine puts the shards beside the model (memory cores against
compute cores). Pinned apart they share no core, but a shard's gRPC server, the lookup agent and
the model share the last-level cache. ``bench interference`` bounds what *steady* work on the
memory cores costs; this benchmark measures the pattern decode really has -- a short burst of
memory-side work per step, just before or alongside the model's compute -- and separates the
shards' part of it from the agent's.

One timed chunk of compute -- a decode step of a backbone of ``layers`` blocks (default: the
blocks before the 100B table's first Engram layer, which a step's first lookup overlaps) --
runs under four conditions, in an order rotated every iteration:

* ``none``:     the chunk right after the previous one (the baseline);
* ``idle``:     the model thread sleeps first for a lookup's round trip (as when it blocks);
* ``inflight``: a decode step's lookups (every Engram layer, ordered, through the agent) go out
                just before the chunk and are read after it (what prefetching does);
* ``after``:    the lookups go out and the thread blocks until they are in, then the chunk.

Two memory settings, each a fresh deployment on Ray (the agent is one per node and service):

* ``shards``:     every lookup is answered by a shard, on this machine's memory cores, as in
                  ``bench offload``;
* ``agent_only``: the agent's row cache holds every row the benchmark asks for (warmed first),
                  so the shards do nothing: what stays on a compute node when the shards live
                  on memory nodes.

Each condition is paired with its iteration's ``none`` run: the extra microseconds of the
chunk, median and quartiles. ``after - idle`` is what the memory side's work costs the compute
that follows it, beyond the sleep itself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ..config import EngramConfig, OptimizerConfig, StoreConfig
from .isolation import Isolation
from .memory_source import DeployedShards

__all__ = ["CONDITIONS", "SETTINGS", "run"]

CONDITIONS = ("none", "idle", "inflight", "after")
SETTINGS = ("shards", "agent_only")
#: Distinct decode steps whose rows the benchmark asks for, in turn (the agent_only cache holds all).
POOL = 32


def _check(iterations: int, batch: int, layers: int, settings: tuple[str, ...]) -> None:
    for name, v in (("iterations", iterations), ("batch", batch), ("layers", layers)):
        if v < 1:
            raise ValueError(f"{name}={v}: expected >= 1")
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings or len(set(settings)) != len(settings):
        raise ValueError(f"settings {list(settings)}: expected distinct names of {list(SETTINGS)}")


def _chunk(model_cfg: Any, layers: int, batch: int) -> Any:
    """One decode step (a fresh KV cache, position 0) of a ``layers``-block backbone: seconds."""
    import torch

    from ..model import EngramLM

    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(model_cfg, n_layers=layers), None).eval()
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, 1))

    def once() -> float:
        cache = model.new_cache(batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(tokens, None, cache, 0)
        return time.perf_counter() - t0
    return once


def _measure(agent: Any, steps: list[list[np.ndarray]], once: Any, iterations: int, bar: Any) -> dict[str, Any]:
    """The four conditions, ``iterations`` times each (after one discarded warm-up pass)."""
    def lookups(i: int) -> list[Any]:
        return agent.prefetch_unique_many(steps[i % len(steps)], ordered=True)

    def finish(fetches: list[Any]) -> None:
        for f in fetches:
            f.result()
            f.release()

    rtt = []
    for i in range(2 * len(steps)):  # warms the agent (and its cache), and times a round trip
        t0 = time.perf_counter()
        finish(lookups(i))
        rtt.append(time.perf_counter() - t0)
    gap = float(np.median(rtt[len(steps):]))
    misses0 = ((agent.stats().get("cache") or {}).get("misses"))
    times: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for it in range(iterations + 1):
        k = it % len(CONDITIONS)
        for cond in CONDITIONS[k:] + CONDITIONS[:k]:
            if cond == "none":
                t = once()
            elif cond == "idle":
                time.sleep(gap)
                t = once()
            elif cond == "inflight":
                fetches = lookups(it)
                t = once()
                finish(fetches)
            else:
                finish(lookups(it))
                t = once()
            if it:
                times[cond].append(t)
        if bar is not None:
            bar.update(1)
    base = np.array(times["none"])
    out: dict[str, Any] = {"round_trip_us": 1e6 * gap, "conditions": {}}
    for cond, ts in times.items():
        delta = 1e6 * (np.array(ts) - base)                  # paired with the iteration's none run
        q1, med, q3 = (float(x) for x in np.percentile(delta, [25, 50, 75]))
        out["conditions"][cond] = {"median_us": 1e6 * float(np.median(ts)), "extra_us": med,
                                   "extra_us_quartiles": [q1, q3],
                                   "slowdown": float(np.median(np.array(ts) / base - 1))}
    idle, after = np.array(times["idle"]), np.array(times["after"])
    q1, med, q3 = (float(x) for x in np.percentile(1e6 * (after - idle), [25, 50, 75]))
    out["memory_work_us"] = {"median": med, "quartiles": [q1, q3]}
    cache = agent.stats().get("cache")
    #: Rows the timed lookups fetched from shards despite the cache (0: the shards idled; None: no cache).
    out["timed_cache_misses"] = cache["misses"] - misses0 if cache and misses0 is not None else None
    return out


def run(engram_cfg: EngramConfig, model_cfg: Any, vocab: Any, *, iterations: int = 200, batch: int = 8,
        layers: int | None = None, shards: int = 2, max_resident_gib: float = 1.0,
        settings: tuple[str, ...] = SETTINGS, progress: bool = False) -> dict[str, Any]:
    """Deploy the table once per setting and time the chunk under every condition; the report."""
    from ..core.indexer import RowIndexer

    layers = layers if layers is not None else min(engram_cfg.layer_ids)
    _check(iterations, batch, layers, settings)
    iso = Isolation.split()
    if not iso.enabled:
        raise ValueError("bench overlap needs at least 2 cores: the model on one side, the memory side on the other")
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="none"))
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    record: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(settings) * (iterations + 1), desc="bench overlap", unit="iteration")
    iso.memory_side()  # before Ray and the shards start: they inherit it
    try:
        for setting in settings:
            with DeployedShards(engram_cfg, vocab, shards=shards, store=store, max_resident_gib=max_resident_gib,
                                name="bench-overlap") as src:
                iso.pin_children()
                indexer = RowIndexer.build(engram_cfg, vocab, layout=src.layout)
                tokens = rng.integers(0, vocab.num_tokens, size=(POOL, batch, 1))
                steps = [list(indexer.rows(t)) for t in tokens]                  # POOL x L x [B, 1, H]
                ids = sum(int(np.unique(np.concatenate([r.ravel() for r in s])).size) for s in steps)
                # room to spare: the cache is set-associative, and a row evicted by a conflict goes to a shard
                cache = 16 * ids * src.layout.row_bytes("float32") if setting == "agent_only" else 0
                # LRU admits every row it sees (TinyLFU may refuse a row until it has been asked often)
                agent = src.agent_client(cache_bytes=max(cache, 4 << 20) if cache else 0, cache_policy="lru")
                try:
                    def body(agent: Any = agent, steps: list[list[np.ndarray]] = steps
                             ) -> tuple[dict[str, Any], dict[str, Any]]:
                        res = _measure(agent, steps, _chunk(model_cfg, layers, batch), iterations, bar)
                        return res, iso.record()  # while the model thread and the shards are alive
                    results[setting], record = iso.run_model(body)
                    st = agent.stats()
                    results[setting]["cache"] = st.get("cache")
                    results[setting]["lookups"] = st.get("lookups")
                finally:
                    agent.close()
    finally:
        iso.restore()
        if bar is not None:
            bar.close()
    return {"benchmark": "overlap", "engram": engram_cfg.to_dict(), "model": dataclasses.asdict(model_cfg),
            "chunk": {"layers": layers, "decode_batch": batch, "what": "one decode step, fresh KV cache"},
            "iterations": iterations, "order": "conditions rotated every iteration, one warm-up iteration",
            "table": {"shards": shards, "max_resident_gib": max_resident_gib}, "results": results,
            "isolation": record,
            "note": "extra_us: the chunk's time under the condition minus the same iteration's 'none' run; "
                    "memory_work_us: 'after' minus 'idle' (the memory side's work, beyond the sleep)"}
