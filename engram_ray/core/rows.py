"""Deterministic initial values of table rows (pure numpy).

A row's initial values depend only on ``(seed, global row, dim, std)``: rows are drawn in
fixed blocks of :data:`INIT_BLOCK_ROWS`, each from a generator seeded by ``(seed, block)``.
Any number of shards -- and the in-process table of ``model.LocalMemory`` -- therefore hold
the very same table, and a shard can rebuild its range without seeing the others.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INIT_BLOCK_ROWS", "init_rows_f32"]

INIT_BLOCK_ROWS = 1 << 16


def init_rows_f32(start: int, stop: int, dim: int, *, seed: int, std: float,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Initial float32 values of global rows ``[start, stop)``, ``[stop-start, dim]``; written
    into ``out`` (any float dtype, cast on assignment) when given."""
    if not 0 <= start <= stop:
        raise ValueError(f"init_rows: bad row range [{start}, {stop})")
    if out is None:
        out = np.empty((stop - start, dim), dtype=np.float32)
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        b0 = block * INIT_BLOCK_ROWS
        lo, hi = max(start, b0), min(stop, b0 + INIT_BLOCK_ROWS)
        rng = np.random.default_rng([seed, block])
        # Always draw the whole block, so a row's values never depend on where a range ends.
        vals = rng.standard_normal((INIT_BLOCK_ROWS, dim), dtype=np.float32)
        if std != 1.0:
            vals *= np.float32(std)
        out[lo - start: hi - start] = vals[lo - b0: hi - b0]
    return out
