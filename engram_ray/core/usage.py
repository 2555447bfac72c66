"""How much of a table its traffic touches, and how skewed that traffic is -- in bounded memory.

Operators sizing an Engram table ask two things of a running service: what share of each
(layer, n-gram order) table is ever read (*utilisation*), and how concentrated the reads are
(*skew*: the share of reads that go to the hottest rows, which is what a cache can catch).
A bit per row would cost 150 MiB for the 1.25B rows of a 100B table, per shard a share of it;
this module costs ~16 KiB per table and a bounded sample:

* :class:`HyperLogLog` -- distinct ids seen, ``2**p`` one-byte registers, standard error
  ``1.04 / sqrt(2**p)`` (0.8 % at p = 14; Flajolet et al. 2007, with linear counting for
  small counts);
* :class:`RowUsage` -- one HyperLogLog per (layer, order) table a shard holds rows of, plus
  exact read counts of a 1-in-``sample`` hash sample of the rows (capped), for the top-k
  shares. Reads are queued and folded in batches: a lookup pays a list append.

Pure numpy + stdlib, like the rest of ``core``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .layout import TableLayout

__all__ = ["HyperLogLog", "RowUsage", "mix64"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit mix of int64 ``ids`` (xor-shift-multiply, twice; uint64 wraps, as meant)."""
    x = np.asarray(ids).astype(np.uint64) ^ np.uint64(seed)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class HyperLogLog:
    """Distinct count of int64 ids in ``2**p`` registers."""

    def __init__(self, p: int = 14):
        if not 4 <= p <= 18:
            raise ValueError(f"HyperLogLog p={p}: expected 4..18")
        self.p = p
        self.registers = np.zeros(1 << p, dtype=np.uint8)

    def add(self, ids: np.ndarray) -> None:
        h = mix64(ids, seed=0x5EED)
        idx = (h >> np.uint64(64 - self.p)).astype(np.int64)
        rest = h << np.uint64(self.p)                          # the other 64 - p bits, on top
        # rank = leading zeros of `rest` + 1 (64 - p + 1 when rest is 0); floor(log2) via float64:
        # off by one only when the top 53 bits are all ones (a 2**-53 chance), harmless here
        top = np.floor(np.log2(np.maximum(rest, np.uint64(1)).astype(np.float64))).astype(np.int64)
        rank = np.where(rest == 0, 64 - self.p + 1, 64 - top).astype(np.uint8)
        np.maximum.at(self.registers, idx, rank)

    def merge(self, other: HyperLogLog) -> None:
        if other.p != self.p:
            raise ValueError(f"HyperLogLog: cannot merge p={other.p} into p={self.p}")
        np.maximum(self.registers, other.registers, out=self.registers)

    def count(self) -> float:
        m = float(self.registers.size)
        alpha = 0.7213 / (1 + 1.079 / m)
        est = alpha * m * m / float(np.sum(np.ldexp(1.0, -self.registers.astype(np.int64))))
        zeros = int(np.count_nonzero(self.registers == 0))
        if est <= 2.5 * m and zeros:  # small counts: linear counting is the better estimate
            return m * float(np.log(m / zeros))
        return est


class RowUsage:
    """Reads of rows ``[row_start, row_stop)`` of ``layout``: distinct rows per (layer, order)
    table and the read counts of a 1-in-``sample`` sample of rows (at most ``max_sampled``
    kept; when full, the least read half is dropped -- the top shares stay right, the tail's
    count is kept in ``sampled_reads``). Thread-safe: lookups record from a server's pool."""

    def __init__(self, layout: TableLayout, row_start: int = 0, row_stop: int | None = None, *,
                 p: int = 14, sample: int = 64, max_sampled: int = 1 << 20, batch: int = 1 << 16):
        stop = layout.total_rows if row_stop is None else row_stop
        k = layout.n_head_per_ngram
        #: (layer id, n-gram order, first row, end row) of every table part held here
        self.tables: list[tuple[int, int, int, int]] = []
        for li, layer in enumerate(layout.layer_ids):
            for o in range(layout.max_ngram_size - 1):
                lo = int(layout.offsets[li, o * k])
                hi = int(layout.offsets[li, (o + 1) * k - 1]) + layout.head_sizes[li][(o + 1) * k - 1]
                a, b = max(lo, row_start), min(hi, stop)
                if a < b:
                    self.tables.append((layer, o + 2, a, b))
        self._edges = np.array([t[2] for t in self.tables] + [self.tables[-1][3] if self.tables else 0])
        self._hll = [HyperLogLog(p) for _ in self.tables]
        self.sample, self.max_sampled, self.batch = sample, max_sampled, batch
        self._keys = np.empty(0, dtype=np.int64)      # sampled rows, sorted
        self._counts = np.empty(0, dtype=np.int64)    # their reads
        self.sampled_reads = 0                         # reads of sampled rows, dropped ones too
        self._dropped = 0                              # sampled rows dropped (the least read)
        self.reads = 0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._lock = threading.Lock()

    def add(self, ids: np.ndarray) -> None:
        """Record a lookup's ids (global, in this range; any order and repeats). Cheap: the ids
        are queued and folded ``batch`` at a time."""
        with self._lock:
            self._pending.append(ids)
            self._pending_n += ids.size
            if self._pending_n >= self.batch:
                self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        ids = np.concatenate(self._pending).astype(np.int64, copy=False)
        self._pending, self._pending_n = [], 0
        self.reads += ids.size
        which = np.searchsorted(self._edges, ids, side="right") - 1
        for t, hll in enumerate(self._hll):
            mine = ids[which == t]
            if mine.size:
                hll.add(mine)
        picked = ids[mix64(ids, seed=0x5A3B1E) % np.uint64(self.sample) == 0]
        if picked.size:
            self.sampled_reads += picked.size
            keys, counts = np.unique(np.concatenate([self._keys, picked]), return_counts=True)
            # counts so far come back as 1 each from the concatenation: add what they were
            old = np.searchsorted(keys, self._keys)
            counts[old] += self._counts - 1
            if keys.size > self.max_sampled:
                keep = np.sort(np.argsort(counts, kind="stable")[-self.max_sampled // 2:])
                self._dropped += keys.size - keep.size
                keys, counts = keys[keep], counts[keep]
            self._keys, self._counts = keys, counts

    def report(self, top: tuple[float, ...] = (0.01, 0.1)) -> dict[str, Any]:
        """Per table: rows held here, distinct rows read (estimated), utilisation; and the share
        of the sampled reads that went to the top ``top`` fraction of sampled rows read."""
        with self._lock:
            self._fold()
            touched = [hll.count() for hll in self._hll]
            tables = [{"layer": layer, "order": order, "rows": b - a, "touched": n,
                       "utilisation": min(1.0, n / (b - a))} for (layer, order, a, b), n in zip(self.tables, touched)]
            counts = np.sort(self._counts)[::-1]
            total, population = self.sampled_reads, counts.size + self._dropped
        shares = {}
        for f in top:  # the top share of every sampled row read, dropped ones included
            k = min(counts.size, max(1, int(np.ceil(f * population)))) if counts.size else 0
            shares[f"top{f * 100:g}pct_share"] = float(counts[:k].sum() / total) if total else None
        return {"tables": tables, "reads": self.reads, "sampled_rows": int(population),
                "sampled_reads": total, **shares}
