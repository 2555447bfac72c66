"""Request latency histogram and process RSS for a shard's Describe (no dependencies).

Fixed log-spaced buckets (0.05 ms .. ~100 s, 5 per decade): recording is a bisect and an
add under a lock, cheap enough for every request; quantiles are read as the upper edge of
the bucket that holds them, so p99 is an upper bound within one bucket (a factor 1.58).
"""

from __future__ import annotations

import bisect
import os
import resource
import sys
import threading

__all__ = ["LatencyHistogram", "rss_bytes", "BUCKETS_S"]

#: Upper edges, in seconds, of the latency buckets.
BUCKETS_S: tuple[float, ...] = tuple(5e-5 * 10 ** (i / 5) for i in range(32))


class LatencyHistogram:
    """Counts of request latencies in :data:`BUCKETS_S` (and one overflow bucket)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.total = 0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS_S, seconds)
        with self._lock:
            self.counts[i] += 1
            self.total += 1

    def quantile(self, q: float) -> float | None:
        """Seconds below which a fraction ``q`` of requests finished (None if none)."""
        with self._lock:
            counts, total = list(self.counts), self.total
        if not total:
            return None
        rank, seen = q * total, 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank and c:
                return BUCKETS_S[min(i, len(BUCKETS_S) - 1)]
        return BUCKETS_S[-1]


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
