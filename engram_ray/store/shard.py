"""``TableShard``: one contiguous range of the global row space, in host RAM (or, with
``StoreConfig(storage="mmap")``, in a memory-mapped file: :mod:`.mapped`).

It serves gathers by global row id and applies sparse optimiser steps to pushed gradients.
Every request is validated in full before anything is touched, so a rejected request changes
nothing, and no step ever stores a value that is not finite. Updates are serialised by a lock;
a lookup running during an update sees each row as it was before the update or after it,
never half of each: gathers read under a sequence lock (below), because numpy copies rows
with the GIL released, so a copy and a write of the same row can interleave.
"""

from __future__ import annotations

import os
import threading
from typing import Any, NamedTuple

import numpy as np

from ..config import FLOAT_DTYPES, StoreConfig
from ..core.dtypes import FP8, row_width
from ..core.layout import ShardPlan, TableLayout
from ..core.optim import SparseOptimizer, finite_rows, lr_error, sum_duplicates
from ..errors import InvalidRequest
from .mapped import mapped_stats, open_rows
from .rows import init_rows, numpy_dtype, sha256_hex

__all__ = ["TableShard", "Saved", "GRAD_DTYPES"]

#: Gradient dtypes a shard accepts (widened to float32 before anything else).
GRAD_DTYPES = (*FLOAT_DTYPES, "float64")


class Saved(NamedTuple):
    """A checkpoint piece written: its header's path and the sha256 of the rows in it."""

    path: str
    sha256: str


class TableShard:
    """Rows ``[row_start, row_stop)`` of a table with layout ``fingerprint``."""

    def __init__(self, *, fingerprint: str, row_start: int, row_stop: int, dim: int,
                 store: StoreConfig = StoreConfig(), shard_index: int = 0, num_shards: int = 1,
                 values: np.ndarray | None = None, layout: TableLayout | None = None):
        if not 0 <= row_start < row_stop:
            raise ValueError(f"TableShard: row range [{row_start}, {row_stop}) is empty or negative")
        self.fingerprint = fingerprint
        #: The table's layout, when the shard was made from one (which table a row is in).
        self.layout = layout
        self.row_start, self.row_stop, self.dim = int(row_start), int(row_stop), int(dim)
        #: Stored elements per row: ``dim`` values, or an FP8 row's packed bytes (codes + scales).
        self.width = row_width(store.dtype, self.dim)
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
        if values.shape != (self.resident_rows, self.width) or values.dtype != self.dtype:
            raise ValueError(f"TableShard: values {values.dtype} {values.shape}; expected "
                             f"{self.dtype} {(self.resident_rows, self.width)}")
        self.values = values
        opt = store.optimizer if not self.capped else type(store.optimizer)(kind="none")
        self.optimizer = SparseOptimizer(opt, self.resident_rows, dim)
        #: Serialises writers (updates, restores) and consistent copies (snapshots, saves).
        self._lock = threading.Lock()
        #: Sequence lock for readers: odd while a writer stores rows. A gather that saw it odd
        #: or changed copied rows that were being written, and reads them again.
        self._version = 0
        self.counters = {"lookups": 0, "rows_served": 0, "updates": 0, "rows_updated": 0,
                         "rejected": 0, "restores": 0}

    @classmethod
    def create(cls, layout: TableLayout, num_shards: int, shard_index: int,
               store: StoreConfig = StoreConfig()) -> TableShard:
        """The shard ``shard_index`` of ``num_shards`` equal ranges of ``layout``'s rows."""
        start, stop = ShardPlan(layout.total_rows, num_shards).shard_range(shard_index)
        values = None
        if store.storage == "mmap":  # filled once with the initial rows, reopened after
            def initial(a: int, b: int) -> np.ndarray:
                return init_rows(a, b, layout.row_dim, seed=store.init_seed, std=store.init_std, dtype=store.dtype)
            values = open_rows(store.data_dir, layout.fingerprint, start, stop,
                               row_width(store.dtype, layout.row_dim), store.dtype,
                               f"init seed={store.init_seed} std={store.init_std}", initial)
        return cls(fingerprint=layout.fingerprint, row_start=start, row_stop=stop,
                   dim=layout.row_dim, store=store, shard_index=shard_index, num_shards=num_shards, values=values,
                   layout=layout)

    @classmethod
    def empty(cls, layout: TableLayout, num_shards: int, shard_index: int,
              store: StoreConfig = StoreConfig()) -> TableShard:
        """The shard's range with zero rows (lazily mapped, so it costs no RAM until written):
        a placeholder for a copy that must not serve what it would otherwise load."""
        start, stop = ShardPlan(layout.total_rows, num_shards).shard_range(shard_index)
        n = min(stop - start, store.resident_rows_per_shard or stop - start)
        return cls(fingerprint=layout.fingerprint, row_start=start, row_stop=stop, dim=layout.row_dim,
                   store=store, shard_index=shard_index, num_shards=num_shards,
                   values=np.zeros((n, row_width(store.dtype, layout.row_dim)), dtype=numpy_dtype(store.dtype)),
                   layout=layout)

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
        return self.width * self.dtype.itemsize

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
        if r.size:  # the ufuncs' own reduce: ndarray.min() adds two Python layers, per lookup
            lo, hi = int(np.minimum.reduce(r)), int(np.maximum.reduce(r))
            if lo < self.row_start or hi >= self.row_stop:
                bad = lo if lo < self.row_start else hi
                raise InvalidRequest(f"row id {bad} is outside shard {self.shard_index}'s rows "
                                     f"[{self.row_start}, {self.row_stop})")
        return r.astype(np.int64, copy=False) - self.row_start

    # Serving -------------------------------------------------------------------------
    def gather(self, rows: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[n, width]`` as stored for global ids ``rows [n]``, into ``out`` if given.
        Each row is read whole: as it was before a concurrent update, or after it."""
        local = self.local_rows(rows)
        if out is not None and (out.shape != (local.size, self.width) or out.dtype != self.dtype):
            raise InvalidRequest(f"gather: out is {out.dtype} {out.shape}; expected "
                                 f"{self.dtype} {(local.size, self.width)}")
        if self.capped:
            local = local % self.resident_rows
        # Lock-free while no update runs (the common case: lookups never wait for each other);
        # a copy that overlapped a write is taken again, under the writers' lock after 3 tries.
        for _ in range(3):
            v = self._version
            if v % 2 == 0:
                res = self.values.take(local, axis=0, out=out)  # the method: np.take wraps it in Python
                if self._version == v:
                    break
        else:
            with self._lock:
                res = self.values.take(local, axis=0, out=out)
        self.counters["lookups"] += 1
        self.counters["rows_served"] += int(local.size)
        return res

    def _store(self, local: np.ndarray | None, values: np.ndarray) -> None:
        """Write rows (all of them when ``local`` is None); call with ``_lock`` held."""
        self._version += 1  # odd: readers retry
        try:
            if local is None:
                self.values[...] = values
            else:
                self.values[local] = values
        finally:
            self._version += 1

    def apply_gradients(self, rows: Any, grads: Any, lr: float | None = None) -> int:
        """One optimiser step on rows ``[n]`` with gradients ``[n, dim]`` (float32, or
        bfloat16/float16/float64, widened); duplicate ids are summed first. ``lr``: this step's
        learning rate (a trainer's schedule), or None for the configured one. Returns the
        number of distinct rows updated. Refused, changing nothing, when a gradient or the sum
        of a row's duplicates is not finite, when ``lr`` is not a rate (``config.lr_error``), or when the step
        would store a value (or optimiser state) that is not finite in the storage dtype."""
        if lr is not None and lr_error(lr):
            raise InvalidRequest(f"{lr_error(lr)} (or none: the shard's own, {self.store.optimizer.lr})")
        local = self.local_rows(rows)
        if self.store.dtype == FP8:
            raise InvalidRequest(f"shard {self.shard_index} serves an FP8 table, read-only: it refuses updates "
                                 "(train a float32 or bfloat16 table, or serve this one for inference)")
        if self.capped:
            raise InvalidRequest(f"shard {self.shard_index} keeps {self.resident_rows} of its "
                                 f"{self.num_rows} rows resident (a benchmark table): it serves "
                                 "lookups only and refuses updates")
        g = np.asarray(grads)
        if g.shape != (local.size, self.dim):
            raise InvalidRequest(f"gradients have shape {g.shape}; expected {(local.size, self.dim)} "
                                 f"(one row of {self.dim} per id)")
        if g.dtype.name not in GRAD_DTYPES:
            raise InvalidRequest(f"gradients must be floating point ({', '.join(GRAD_DTYPES)}), "
                                 f"got dtype {g.dtype}")
        g = g.astype(np.float32, copy=False)
        bad = ~finite_rows(g) if g.size else np.zeros(0, bool)
        if bad.any():
            raise InvalidRequest(f"gradient for row id {self._first(local, bad)} is not finite "
                                 "(NaN or Inf); nothing was applied")
        if local.size == 0:
            return 0
        with np.errstate(over="ignore", invalid="ignore"):
            uniq, g = sum_duplicates(local, g)
        bad = ~finite_rows(g)
        if bad.any():
            raise InvalidRequest(f"gradients for row id {self._first(uniq, bad)} overflow float32 when its "
                                 "duplicates are summed; nothing was applied (scale the loss down)")
        with self._lock:
            w = self.values[uniq].astype(np.float32)
            new, state = self.optimizer.propose(w, uniq, g, lr)
            with np.errstate(over="ignore", invalid="ignore"):
                stored = new.astype(self.dtype)
            bad = ~finite_rows(stored, *state.values())
            if bad.any():
                raise InvalidRequest(
                    f"the {self.optimizer.config.kind} step for row id {self._first(uniq, bad)} would store "
                    f"a value that is not finite in {self.store.dtype} (its row or optimiser state "
                    "overflows: the gradient is too large); nothing was applied")
            self.optimizer.commit(uniq, state)
            self._store(uniq, stored)
            self.counters["updates"] += 1
            self.counters["rows_updated"] += int(uniq.size)
        return int(uniq.size)

    def _first(self, local: np.ndarray, bad: np.ndarray) -> int:
        """The global id of the first flagged row, for an error message."""
        return int(local[int(np.flatnonzero(bad)[0])]) + self.row_start

    # Whole-shard copies ------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """A consistent copy of the rows and the optimiser state ("rows", "adam_m", ...),
        taken under the writers' lock: no update falls between the arrays."""
        with self._lock:
            return {"rows": self.values.copy(), **{k: v.copy() for k, v in self.optimizer.state().items()}}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the rows (and the optimiser state, when given) by ``arrays`` as
        :meth:`snapshot` returns them; every array is checked before anything is written."""
        rows = arrays.get("rows")
        if rows is None or rows.shape != self.values.shape or rows.dtype != self.dtype:
            got = None if rows is None else (rows.dtype, rows.shape)
            raise InvalidRequest(f"restore: rows are {got}; expected {(self.dtype, self.values.shape)}")
        state = self.optimizer.state()
        given = {k: arrays[k] for k in state if k in arrays}
        if given and set(given) != set(state):
            raise InvalidRequest(f"restore: optimiser state {sorted(given)}; expected all of {sorted(state)}")
        for k, a in given.items():
            if a.shape != state[k].shape or a.dtype != state[k].dtype:
                raise InvalidRequest(f"restore: {k} is {a.dtype} {a.shape}; expected "
                                     f"{state[k].dtype} {state[k].shape}")
        if not finite_rows(rows, *given.values()).all():
            raise InvalidRequest("restore: the rows or optimiser state hold values that are not finite")
        with self._lock:
            if given:
                self.optimizer.load_state(given)
            self._store(None, rows)
            self.counters["restores"] += 1

    @property
    def rows_version(self) -> int:
        """How many times the rows changed while this shard lived (updates applied + restores):
        what lookup and push answers carry, so a client's row cache sees any change."""
        return self.counters["updates"] + self.counters["restores"]

    # Identity ---------------------------------------------------------------------------
    def checksum(self) -> str:
        """sha256 of the rows' bytes: equal tables have equal checksums."""
        with self._lock:  # never of a table half-way through an update
            return sha256_hex(self.values)

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "shard_index": self.shard_index,
                "num_shards": self.num_shards, "row_start": self.row_start,
                "row_stop": self.row_stop, "dim": self.dim, "dtype": self.store.dtype,
                "optimizer": self.optimizer.config.kind, "bytes": self.nbytes,
                "resident_rows": self.resident_rows,
                "storage": "mmap" if isinstance(self.values, np.memmap) else "ram",
                **mapped_stats(self.values), "counters": dict(self.counters)}

    # Checkpoints -------------------------------------------------------------------------
    def save(self, directory, *, dir_fd: int | None = None) -> Saved:
        """Write this shard into checkpoint ``directory`` (see :mod:`.checkpoint`); ``dir_fd``:
        that directory, already opened (as :func:`~.checkpoint.open_under` does)."""
        from .checkpoint import save_shard
        if self.capped:
            raise InvalidRequest(f"shard {self.shard_index} is a capped benchmark table "
                                 f"({self.resident_rows} of {self.num_rows} rows resident); "
                                 "it has no real rows to checkpoint")
        return save_shard(self, directory, dir_fd=dir_fd)

    @classmethod
    def load(cls, directory, layout: TableLayout, num_shards: int, shard_index: int,
             store: StoreConfig = StoreConfig()) -> TableShard:
        """Shard ``shard_index`` of ``num_shards`` from a checkpoint written with any shard count."""
        from .checkpoint import load_range, verify_range
        start, stop = ShardPlan(layout.total_rows, num_shards).shard_range(shard_index)
        width = row_width(store.dtype, layout.row_dim)  # checkpoints hold rows as stored
        values: np.ndarray
        if store.storage == "mmap":  # copied into the mapped file once, reopened after
            def from_checkpoint(a: int, b: int) -> np.ndarray:
                if a == start:  # the first chunk: every piece's checksum once, not once per chunk
                    verify_range(directory, layout.fingerprint, start, stop)
                return load_range(directory, layout.fingerprint, a, b, width, store.dtype, verify=False)[0]
            values = open_rows(store.data_dir, layout.fingerprint, start, stop, width, store.dtype,
                               f"checkpoint {os.path.realpath(directory)}", from_checkpoint)
            state: dict[str, np.ndarray] = {}
        else:
            values, state = load_range(directory, layout.fingerprint, start, stop, width,
                                       store.dtype, with_state=store.optimizer.kind == "adam")
        shard = cls(fingerprint=layout.fingerprint, row_start=start, row_stop=stop,
                    dim=layout.row_dim, store=store, shard_index=shard_index,
                    num_shards=num_shards, values=values, layout=layout)
        if state:
            shard.optimizer.load_state(state)
        return shard
