"""``RowCache``: the hottest rows of a table, kept by the client that fetches them.

N-gram frequencies follow a Zipf law, so a small share of a table's rows serves most lookups
(the paper's §2.5 / §7 hierarchy: hot rows near compute, the long tail remote). A node's lookup
agent owns one client for every worker on the node, so a cache there serves them all.

Layout: **set-associative**, ``sets x ways`` entries. A row id maps to one set (a multiplicative
hash of the id), and lives in one of its ``ways``. Every operation is a handful of vectorised numpy
ops over a lookup's unique ids -- no Python per id, no dict of millions of entries (a dict costs
~100 B an entry and ~50 ns an id in Python; the arrays here cost 8 + 8 B an entry besides the
rows and a few ns an id).

Policies (``policy``):

* ``"lru"``: a miss replaces its set's least recently used way;
* ``"tinylfu"``: as LRU, but a miss is *admitted* only if it has been asked for more often than
  the row it would evict, by a count-min sketch of every id asked for (4 rows of counters up to
  255, halved every ``10 x capacity`` increments, so old popularity fades). One-off ids of the long
  tail then never push a hot row out -- what Zipf traffic needs (Einziger et al., TinyLFU).

Freshness (the caller keeps it, see :class:`~.transfers.Transfers`): rows pushed through the
owning client are invalidated when the push starts and again when it is acknowledged, and rows
that were in flight while a push ran are not inserted (``epoch``); a shard's rows are dropped
when a lookup shows that shard was updated since they were cached (``drop_range``).

Only the client's I/O thread touches a cache: no lock.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..core.usage import mix64

__all__ = ["RowCache", "POLICIES", "DEFAULT_POLICY", "check_cache_bytes"]

POLICIES = ("lru", "tinylfu")
#: Measured with ``engram-ray bench cache`` (docs/RESULTS.md): over both corpora, both layouts
#: and five sizes the two policies' mean hit rates are equal (28.2 % vs 27.8 %); LRU wins on
#: code and on the 100B layout (stdlib, 0.01 % of the table: 34.8 % vs 26.3 %), TinyLFU on prose
#: and when a lookup is large against the cache (Shakespeare 1 % of the demo: 3.2 % vs 0.0 %).
#: LRU needs no sketch: half the agent's CPU per lookup. So LRU by default, TinyLFU on demand.
DEFAULT_POLICY = "lru"

_SKETCH_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)
_SET_SEED = 0x2545F4914F6CDD1D


def check_cache_bytes(nbytes: float) -> None:
    """Refuse a cache size that is negative or more than this machine's RAM (the arrays are
    allocated lazily: an oversized cache would start, then be killed as it fills)."""
    if not nbytes >= 0:
        raise ValueError(f"cache of {nbytes} bytes: expected a size >= 0")
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not knowable here: nothing to check against
        return
    if nbytes > ram:
        raise ValueError(f"cache of {nbytes / 2**30:.1f} GiB exceeds this machine's {ram / 2**30:.1f} GiB "
                         "of RAM; give a size that leaves room for the rest (e.g. --cache-gib 4)")


class RowCache:
    """Up to ``capacity`` rows of ``width`` elements (storage ``dtype``), by global row id."""

    def __init__(self, capacity: int, width: int, dtype: Any, *, ways: int = 8, policy: str = DEFAULT_POLICY):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if capacity < 1 or ways < 1:
            raise ValueError(f"cache of {capacity} rows in {ways} ways: expected positive counts")
        self.ways = min(ways, capacity)
        self.sets = capacity // self.ways
        self.capacity = self.sets * self.ways
        self.policy = policy
        self.keys = np.full((self.sets, self.ways), -1, dtype=np.int64)      # row id, -1: empty
        self.stamp = np.full((self.sets, self.ways), -1, dtype=np.int64)     # last use, -1: empty
        self.rows = np.zeros((self.capacity, width), dtype=dtype)
        self._tick = 0
        #: Bumped by every push through the owning client: rows fetched across one are stale.
        self.epoch = 0
        self.counts = {"hits": 0, "misses": 0, "inserts": 0, "evictions": 0, "rejected": 0,
                       "invalidated": 0}
        # TinyLFU's frequency sketch: 4 rows of counters, a power of two of them per row
        # about a counter per cached row in each of 4 rows (TinyLFU's sizing), 2 B each: for a
        # 1 GiB cache of 336-byte rows, 32 MiB of sketch
        self._width_bits = max(10, int(np.ceil(np.log2(max(2, self.capacity)))))
        self._sketch = (np.zeros((4, 1 << self._width_bits), dtype=np.uint16)
                        if policy == "tinylfu" else None)
        self._sketch_adds = 0

    @classmethod
    def for_bytes(cls, nbytes: int, width: int, dtype: Any, **kw: Any) -> RowCache:
        """The cache that takes about ``nbytes``: rows, 16 B of index a row, and for TinyLFU
        its sketch (about 8 B a row). Refused if this machine's RAM could not hold it."""
        tinylfu = kw.get("policy", DEFAULT_POLICY) == "tinylfu"
        row = width * np.dtype(dtype).itemsize + 16 + (8 if tinylfu else 0)
        check_cache_bytes(nbytes)
        if nbytes < row:
            raise ValueError(f"a cache of {nbytes} bytes holds no row of {row} bytes")
        return cls(nbytes // row, width, dtype, **kw)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.keys.nbytes + self.stamp.nbytes + \
            (self._sketch.nbytes if self._sketch is not None else 0)

    @property
    def size(self) -> int:
        """Rows held now."""
        return int(np.count_nonzero(self.keys >= 0))

    def _set_of(self, ids: np.ndarray) -> np.ndarray:
        return (mix64(ids, _SET_SEED) % np.uint64(self.sets)).astype(np.int64)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(set, way, hit)`` per id: where an id is held (way valid where ``hit``)."""
        s = self._set_of(ids)
        match = self.keys[s] == ids[:, None]                                    # [n, ways]
        return s, match.argmax(axis=1), match.any(axis=1)

    # Lookups --------------------------------------------------------------------------------
    def get(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the held rows of ``ids`` (unique, int64 ``[n]``) into ``out[i]``; returns the
        hit mask ``[n]`` (the rest of ``out`` is untouched). Counts every id for TinyLFU."""
        self._tick += 1
        s, way, hit = self._find(ids)
        if hit.any():
            hs, hw = s[hit], way[hit]
            out[hit] = self.rows[hs * self.ways + hw]
            self.stamp[hs, hw] = self._tick
        n_hit = int(np.count_nonzero(hit))
        self.counts["hits"] += n_hit
        self.counts["misses"] += ids.size - n_hit
        if self._sketch is not None:
            self._record(ids)
        return hit

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Offer fetched rows (unique ids, e.g. a lookup's misses): each takes its set's least
        recently used way, if the policy admits it. Ids held already (concurrent lookups that
        missed the same row) are left as they are: a row is never held twice, so forgetting
        it (:meth:`invalidate`) forgets it."""
        if ids.size == 0:
            return
        held = self._find(ids)[2]
        if held.any():
            ids, rows = ids[~held], rows[~held]
            if ids.size == 0:
                return
        s = self._set_of(ids)
        # the k-th id of a batch that maps to a set gets that set's k-th least recently used
        # way (empty ways, stamp -1, first): no two ids of a batch take one way; ids beyond a
        # set's ways are not kept
        order = np.argsort(s, kind="stable")
        s_sorted = s[order]
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
        rank = np.empty_like(order)
        rank[order] = np.arange(s.size) - np.repeat(starts, np.diff(np.r_[starts, s.size]))
        fits = rank < self.ways
        by_age = np.argsort(self.stamp[s[fits]], axis=1, kind="stable")            # [m, ways]
        victim = np.zeros_like(s)
        victim[fits] = by_age[np.arange(by_age.shape[0]), rank[fits]]
        old = self.keys[s, victim]
        admit = fits & (old < 0)
        if self._sketch is not None:  # a held row stays unless the newcomer is asked for more
            admit |= fits & (self._estimate(ids) > self._estimate(np.where(old < 0, 0, old)))
        else:
            admit = fits
        self.counts["rejected"] += int(ids.size - np.count_nonzero(admit))
        if not admit.any():
            return
        s, victim, old = s[admit], victim[admit], old[admit]
        self.keys[s, victim] = ids[admit]
        self.stamp[s, victim] = self._tick
        self.rows[s * self.ways + victim] = rows[admit]
        self.counts["inserts"] += int(s.size)
        self.counts["evictions"] += int(np.count_nonzero(old >= 0))

    # Freshness ------------------------------------------------------------------------------
    def invalidate(self, ids: np.ndarray) -> None:
        """Forget the rows of ``ids`` (any order, repeats allowed)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            return
        s, way, hit = self._find(ids)
        self._clear(s[hit], way[hit])

    def drop_range(self, lo: int, hi: int) -> None:
        """Forget every row with ``lo <= id < hi`` (a shard's range that changed)."""
        held = (self.keys >= lo) & (self.keys < hi)
        self._clear(*np.nonzero(held))

    def _clear(self, s: np.ndarray, way: np.ndarray) -> None:
        self.keys[s, way] = -1
        self.stamp[s, way] = -1
        self.counts["invalidated"] += int(s.size)

    # TinyLFU --------------------------------------------------------------------------------
    def _slots(self, ids: np.ndarray) -> list[np.ndarray]:
        """The sketch's counter of ``ids`` in each row: double hashing, ``h1 + k * h2`` (two
        mixes for four rows; Kirsch and Mitzenmacher: as good as four hashes for a sketch)."""
        shift = np.uint64(64 - self._width_bits)
        h1, h2 = mix64(ids, _SKETCH_SEEDS[0]), mix64(ids, _SKETCH_SEEDS[1]) | np.uint64(1)
        return [((h1 + np.uint64(k) * h2) >> shift).astype(np.int64) for k in range(4)]

    def _record(self, ids: np.ndarray) -> None:
        assert self._sketch is not None
        for row, idx in zip(self._sketch, self._slots(ids)):
            np.add.at(row, idx, 1)  # ids of a batch may share a counter: unbuffered adds
            row[idx] = np.minimum(row[idx], 255)  # counts saturate (16-bit cells: no wrap first)
        self._sketch_adds += ids.size
        if self._sketch_adds >= 10 * self.capacity:  # ageing: popularity of long ago fades
            self._sketch >>= 1
            self._sketch_adds //= 2

    def _estimate(self, ids: np.ndarray) -> np.ndarray:
        assert self._sketch is not None
        return np.min([row[idx] for row, idx in zip(self._sketch, self._slots(ids))], axis=0)

    def report(self) -> dict[str, Any]:
        """Counters, hit rate and fill, for the client's statistics."""
        asked = self.counts["hits"] + self.counts["misses"]
        size = self.size
        return {**self.counts, "policy": self.policy, "capacity_rows": self.capacity, "rows": size,
                "fill": size / self.capacity, "bytes": self.nbytes,
                "hit_rate": self.counts["hits"] / asked if asked else None}

    def unhit(self, n: int) -> None:
        """Count ``n`` hits of the last :meth:`get` as misses (the caller fetched them anyway)."""
        self.counts["hits"] -= n
        self.counts["misses"] += n
