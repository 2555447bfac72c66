"""``TableShard``: one contiguous range of the global row space, in host RAM.

It serves gathers by global row id and applies sparse optimiser steps to pushed gradients.
Every request is validated in full before anything is touched, so a rejected request changes
nothing. Updates are serialised by a lock; a lookup running during an update may see a row
before or after it (as in asynchronous sparse training), never a row half of one and half of
the other within a row gather (numpy copies whole rows).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np

from ..config import StoreConfig
from ..core.layout import ShardPlan, TableLayout
from ..core.optim import SparseOptimizer, sum_duplicates
from ..errors import InvalidRequest
from .rows import init_rows, numpy_dtype

__all__ = ["TableShard"]


class TableShard:
    """Rows ``[row_start, row_stop)`` of a table with layout ``fingerprint``."""

    def __init__(self, *, fingerprint: str, row_start: int, row_stop: int, dim: int,
                 store: StoreConfig = StoreConfig(), shard_index: int = 0, num_shards: int = 1,
                 values: np.ndarray | None = None):
        if not 0 <= row_start < row_stop:
            raise ValueError(f"TableShard: row range [{row_start}, {row_stop}) is empty or negative")
        self.fingerprint = fingerprint
        self.row_start, self.row_stop, self.dim = int(row_start), int(row_stop), int(dim)
        self.store = store
        self.shard_index, self.num_shards = shard_index, num_shards
        self.dtype = numpy_dtype(store.dtype)
        n = self.row_stop - self.row_start
        cap = store.resident_rows_per_shard
        #: Resident rows: all of them, or (benchmarks) a capped store that rows map into.
        self.resident_rows = min(n, cap) if cap else n
        if values is None:
            values = init_rows(self.row_start, self.row_start + self.resident_rows, dim,
                               seed=store.init_seed, std=store.init_std, dtype=store.dtype)
        if values.shape != (self.resident_rows, dim) or values.dtype != self.dtype:
            raise ValueError(f"TableShard: values {values.dtype} {values.shape}; expected "
                             f"{self.dtype} {(self.resident_rows, dim)}")
        self.values = values
        opt = store.optimizer if not self.capped else type(store.optimizer)(kind="none")
        self.optimizer = SparseOptimizer(opt, self.resident_rows, dim)
        self._lock = threading.Lock()
        self.counters = {"lookups": 0, "rows_served": 0, "updates": 0, "rows_updated": 0,
                         "rejected": 0}

    @classmethod
    def create(cls, layout: TableLayout, num_shards: int, shard_index: int,
               store: StoreConfig = StoreConfig()) -> "TableShard":
        """The shard ``shard_index`` of ``num_shards`` equal ranges of ``layout``'s rows."""
        start, stop = ShardPlan(layout.total_rows, num_shards).shard_range(shard_index)
        return cls(fingerprint=layout.fingerprint, row_start=start, row_stop=stop,
                   dim=layout.row_dim, store=store, shard_index=shard_index, num_shards=num_shards)

    # ----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Logical rows this shard serves."""
        return self.row_stop - self.row_start

    @property
    def capped(self) -> bool:
        """True when fewer rows are resident than served (a benchmark table)."""
        return self.resident_rows < self.num_rows

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the rows plus optimiser state (allocated; untouched state pages are lazy)."""
        return self.values.nbytes + sum(a.nbytes for a in self.optimizer.state().values())

    def local_rows(self, rows: Any) -> np.ndarray:
        """Validate global row ids (1-D integers inside this shard) and make them local."""
        r = np.asarray(rows)
        if r.ndim != 1:
            raise InvalidRequest(f"row ids must be 1-D, got shape {r.shape}")
        if r.dtype.kind not in "iu":
            raise InvalidRequest(f"row ids must be integers, got dtype {r.dtype}")
        if r.size:
            lo, hi = int(r.min()), int(r.max())
            if lo < self.row_start or hi >= self.row_stop:
                bad = lo if lo < self.row_start else hi
                raise InvalidRequest(f"row id {bad} is outside shard {self.shard_index}'s rows "
                                     f"[{self.row_start}, {self.row_stop})")
        return r.astype(np.int64, copy=False) - self.row_start

    # Serving -------------------------------------------------------------------------
    def gather(self, rows: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[n, dim]`` (storage dtype) for global ids ``rows [n]``, into ``out`` if given."""
        local = self.local_rows(rows)
        if out is not None and (out.shape != (local.size, self.dim) or out.dtype != self.dtype):
            raise InvalidRequest(f"gather: out is {out.dtype} {out.shape}; expected "
                                 f"{self.dtype} {(local.size, self.dim)}")
        if self.capped:
            local = local % self.resident_rows
        res = np.take(self.values, local, axis=0, out=out)
        self.counters["lookups"] += 1
        self.counters["rows_served"] += int(local.size)
        return res

    def apply_gradients(self, rows: Any, grads: Any) -> int:
        """One optimiser step on rows ``[n]`` with gradients ``[n, dim]``; duplicate ids are
        summed first. Returns the number of distinct rows updated."""
        local = self.local_rows(rows)
        if self.capped:
            raise InvalidRequest(f"shard {self.shard_index} keeps {self.resident_rows} of its "
                                 f"{self.num_rows} rows resident (a benchmark table): it serves "
                                 "lookups only and refuses updates")
        g = np.asarray(grads)
        if g.shape != (local.size, self.dim):
            raise InvalidRequest(f"gradients have shape {g.shape}; expected {(local.size, self.dim)} "
                                 f"(one row of {self.dim} per id)")
        if g.dtype.kind != "f":
            raise InvalidRequest(f"gradients must be floating point, got dtype {g.dtype}")
        g = g.astype(np.float32, copy=False)
        if not np.isfinite(g).all():
            bad = int(np.flatnonzero(~np.isfinite(g).all(axis=1))[0])
            raise InvalidRequest(f"gradient for row id {int(local[bad]) + self.row_start} is not "
                                 "finite (NaN or Inf); nothing was applied")
        if local.size == 0:
            return 0
        uniq, g = sum_duplicates(local, g)
        with self._lock:
            w = self.values[uniq].astype(np.float32)
            new = self.optimizer.step(w, uniq, g)
            self.values[uniq] = new.astype(self.dtype, copy=False)
            self.counters["updates"] += 1
            self.counters["rows_updated"] += int(uniq.size)
        return int(uniq.size)

    # Identity ---------------------------------------------------------------------------
    def checksum(self) -> str:
        """sha256 of the rows' bytes: equal tables have equal checksums."""
        return hashlib.sha256(np.ascontiguousarray(self.values).view(np.uint8)).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "shard_index": self.shard_index,
                "num_shards": self.num_shards, "row_start": self.row_start,
                "row_stop": self.row_stop, "dim": self.dim, "dtype": self.store.dtype,
                "optimizer": self.optimizer.config.kind, "bytes": self.nbytes,
                "resident_rows": self.resident_rows,
                "counters": dict(self.counters)}

    # Checkpoints -------------------------------------------------------------------------
    def save(self, directory) -> str:
        """Write this shard into checkpoint ``directory`` (see :mod:`.checkpoint`)."""
        from .checkpoint import save_shard
        if self.capped:
            raise InvalidRequest(f"shard {self.shard_index} is a capped benchmark table "
                                 f"({self.resident_rows} of {self.num_rows} rows resident); "
                                 "it has no real rows to checkpoint")
        return str(save_shard(self, directory))

    @classmethod
    def load(cls, directory, layout: TableLayout, num_shards: int, shard_index: int,
             store: StoreConfig = StoreConfig()) -> "TableShard":
        """Shard ``shard_index`` of ``num_shards`` from a checkpoint written with any shard count."""
        from .checkpoint import load_range
        start, stop = ShardPlan(layout.total_rows, num_shards).shard_range(shard_index)
        values, state = load_range(directory, layout.fingerprint, start, stop, layout.row_dim,
                                   store.dtype, with_state=store.optimizer.kind == "adam")
        shard = cls(fingerprint=layout.fingerprint, row_start=start, row_stop=stop,
                    dim=layout.row_dim, store=store, shard_index=shard_index,
                    num_shards=num_shards, values=values)
        if state:
            shard.optimizer.load_state(state)
        return shard
