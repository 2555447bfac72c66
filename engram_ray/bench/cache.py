"""``engram-ray bench cache``: how many lookups a node's hot-row cache serves, on real text.

The stream is what a node's lookup agent sees when training or prefill runs over a corpus: the
corpus's tokens in steps of ``batch x seq_len``, hashed with the table's layout (the real
hashing), one lookup per Engram layer per step, deduplicated as the client does. It is replayed
through :class:`~engram_ray.client.cache.RowCache` -- the cache the agent runs -- at sizes given
as a share of the table, for each policy. Rows are not stored (the hit rate does not depend on
them), so a 20 % cache of a 100B table costs only its index.

Reported per corpus and layout:

* the hit rate over the stream after a warm-up (the first ``warmup`` share of steps), per
  size and policy, with the ceiling no cache can pass: the share of the measured lookups
  whose row had been read before (the rest are first reads, compulsory misses);
* the Zipf exponent of the rows' read counts (every read, repeats within a step too: the
  text's own frequencies; least squares of log count on log rank over ranks 1..1000), and
  the share of reads that go to the top 1 % of the rows read;
* utilisation: distinct rows read / rows, per (layer, n-gram order) table, exactly and as the
  shards' HyperLogLog estimates it (:class:`~engram_ray.core.usage.RowUsage`).

A cache larger than the stream's distinct rows holds all of them: sizes are capped at twice
that (``capacity_rows`` says what ran), so the 100B layout's curve is its ceiling sooner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..client.cache import POLICIES, RowCache
from ..core.indexer import RowIndexer
from ..core.usage import RowUsage

__all__ = ["run", "stream", "zipf_exponent"]


def stream(indexer: RowIndexer, tokens: np.ndarray, *, batch: int, seq_len: int
           ) -> tuple[list[list[np.ndarray]], np.ndarray, np.ndarray]:
    """Per step, per Engram layer, the sorted unique rows the agent would be asked for; and
    every row read with its number of reads (repeats counted: the text's own frequencies)."""
    per_step = batch * seq_len
    steps = tokens.size // per_step
    if steps < 2:
        raise ValueError(f"{tokens.size} tokens make {steps} steps of {batch} x {seq_len}; "
                         "give more tokens or smaller steps")
    out, seen, reads = [], [], []
    for s in range(steps):
        bt = tokens[s * per_step:(s + 1) * per_step].astype(np.int64).reshape(batch, seq_len)
        rows = indexer.rows(bt)                                          # [L, B, T, H]
        layers = []
        for r in rows:
            u, c = np.unique(r, return_counts=True)
            layers.append(u)
            seen.append(u)
            reads.append(c)
        out.append(layers)
    rows_read, inverse = np.unique(np.concatenate(seen), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(reads)).astype(np.int64)
    return out, rows_read, counts


def zipf_exponent(counts: np.ndarray, ranks: int = 1000) -> float:
    """``s`` of ``count ~ rank ** -s``, fitted by least squares in log-log over the top ``ranks``."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1][:ranks]
    if c.size < 3:
        raise ValueError("a Zipf fit needs at least 3 distinct rows")
    r = np.arange(1, c.size + 1, dtype=np.float64)
    slope = np.polyfit(np.log(r), np.log(c), 1)[0]
    return float(-slope)


def _replay(steps: list[list[np.ndarray]], capacity: int, policy: str, warmup: int) -> dict[str, Any]:
    cache = RowCache(capacity, 1, np.uint8, policy=policy)
    hits = asked = 0
    for k, layers in enumerate(steps):
        for ids in layers:
            out = np.empty((ids.size, 1), np.uint8)
            hit = cache.get(ids, out)
            cache.put(ids[~hit], np.zeros((int((~hit).sum()), 1), np.uint8))
            if k >= warmup:
                hits += int(hit.sum())
                asked += ids.size
    rep = cache.report()
    return {"hit_rate": hits / asked if asked else None, "evictions": rep["evictions"],
            "rejected": rep["rejected"], "fill": rep["fill"]}


def run(indexer: RowIndexer, tokens: np.ndarray, *, corpus: str, preset: str,
        sizes: Sequence[float] = (0.0001, 0.001, 0.01, 0.05, 0.2), policies: Sequence[str] = POLICIES,
        batch: int = 8, seq_len: int = 256, warmup: float = 0.25, progress: bool = False) -> dict[str, Any]:
    """The cache's hit rates on ``tokens`` (one corpus, one layout), the stream's Zipf fit and
    the tables' utilisation."""
    bad = [f for f in sizes if not 0 < f <= 1]
    if bad:
        raise ValueError(f"cache sizes {bad}: expected shares of the table in (0, 1]")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"cache policies {unknown}: choose from {', '.join(POLICIES)}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup={warmup}: expected a share of the steps in [0, 1)")
    layout = indexer.layout
    steps, rows, counts = stream(indexer, tokens, batch=batch, seq_len=seq_len)
    first = int(warmup * len(steps))
    measured = np.concatenate([ids for layers in steps[first:] for ids in layers])
    seen_before = np.unique(np.concatenate([ids for layers in steps[:first] for ids in layers])) \
        if first else np.empty(0, np.int64)
    # the ceiling: a lookup hits only if its row was read before (in the warm-up or earlier here)
    new_rows = np.setdiff1d(np.unique(measured), seen_before).size
    ceiling = 1.0 - new_rows / measured.size
    usage = RowUsage(layout, batch=1 << 20)
    usage.add(rows)
    est = usage.report()["tables"]
    tables = []
    for (layer, order, a, b), e in zip(usage.tables, est):
        exact = int(np.count_nonzero((rows >= a) & (rows < b)))
        tables.append({"layer": layer, "order": order, "rows": b - a, "touched": exact,
                       "utilisation": exact / (b - a), "touched_hll": e["touched"]})
    top = np.sort(counts)[::-1]
    curves: list[dict[str, Any]] = []
    work = [(f, p) for f in sizes for p in policies]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc=f"bench cache {corpus}/{preset}", unit="size")
    for f, policy in work:
        capacity = max(1, min(int(f * layout.total_rows), 2 * rows.size))
        curves.append({"share": f, "policy": policy, "capacity_rows": capacity,
                       **_replay(steps, capacity, policy, first)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"corpus": corpus, "preset": preset, "table_rows": layout.total_rows,
            "tokens": len(steps) * batch * seq_len, "steps": len(steps), "batch": batch, "seq_len": seq_len,
            "warmup_steps": first, "lookups_measured": int(measured.size), "distinct_rows": int(rows.size),
            "hit_rate_ceiling": ceiling, "zipf_exponent": zipf_exponent(counts),
            "top1pct_share": float(top[:max(1, top.size // 100)].sum() / top.sum()),
            "utilisation": rows.size / layout.total_rows, "tables": tables, "curves": curves}
