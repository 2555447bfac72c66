"""``ClientStats``: a client's counters and lookup latencies (thread-safe: the caller's thread
counts what it hands over, the I/O thread what it fetched)."""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

__all__ = ["ClientStats", "COUNTERS", "IO_STAGES"]

#: The counters :meth:`ClientStats.report` always shows (0 until counted).
COUNTERS = ("lookups", "lookups_direct", "lookups_direct_failed", "lookups_streamed", "ids", "unique_ids",
            "bytes_received", "bytes_saved", "pushes", "rows_pushed", "retries", "failovers", "redirects",
            "re_resolved", "errors")
#: lookups_direct: lookups answered on the caller's thread (EngramClient.lookup_unique_now);
#: lookups_direct_failed: tries of it that failed and went the full path.
#: lookups_streamed: direct lookups whose request went on the shard's LookupStream (the rest: a call).
#: Where a lookup's time goes (on the I/O thread, or the caller's for a direct one): dedup
#: (np.unique), encode (build requests), in_flight (calls issued to last answer: transport +
#: shard), decode (bytes -> rows, scatter to the caller's order). On the I/O thread none of
#: it blocks the caller.
IO_STAGES = ("dedup", "encode", "in_flight", "decode")


class ClientStats:
    """Counters by name, per-stage seconds, and the last 10,000 lookup latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: collections.Counter[str] = collections.Counter()
        self._seconds: dict[str, float] = dict.fromkeys(IO_STAGES, 0.0)
        self._latencies: collections.deque[float] = collections.deque(maxlen=10_000)

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self._counters[key] += n

    def lookup_done(self, *, unique_ids: int, nbytes: int, stages: dict[str, float], latency: float) -> None:
        """One lookup's unique ids, bytes received, seconds per stage and issue-to-arrival time."""
        with self._lock:
            self._counters["unique_ids"] += unique_ids
            self._counters["bytes_received"] += nbytes
            for k, s in stages.items():
                self._seconds[k] += s
            self._latencies.append(latency)

    def report(self) -> dict[str, Any]:
        """Requests, ids, unique ids, dedup ratio, bytes, retries, errors, latency percentiles."""
        with self._lock:
            c = dict(self._counters)
            seconds = dict(self._seconds)
            lat = np.array(self._latencies)
        out: dict[str, Any] = {k: c.get(k, 0) for k in COUNTERS}
        ids, uniq = c.get("ids", 0), c.get("unique_ids", 0)
        out["dedup_ratio"] = (uniq / ids) if ids else None  # unique ids fetched per id asked
        out["io_seconds"] = {k: float(seconds[k]) for k in IO_STAGES}
        for q in (50, 90, 99):
            out[f"latency_p{q}_ms"] = float(np.percentile(lat, q) * 1e3) if lat.size else None
        return out
