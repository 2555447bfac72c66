"""Storage dtypes and deterministic row initialisation.

A row's initial values depend only on ``(init_seed, global row, dim, init_std)``: rows are drawn
in fixed blocks of :data:`INIT_BLOCK_ROWS`, each from a generator seeded by
``(init_seed, block index)``. Any number of shards, and any resharding, therefore hold the very
same table, and a shard can rebuild its range without seeing the others.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INIT_BLOCK_ROWS", "numpy_dtype", "init_rows"]

INIT_BLOCK_ROWS = 1 << 16


def numpy_dtype(name: str) -> np.dtype:
    """float32 / float16 natively; bfloat16 through ml_dtypes (numpy has none)."""
    if name == "float32":
        return np.dtype(np.float32)
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"storage dtype {name!r}: expected float32, bfloat16 or float16")


def init_rows(start: int, stop: int, dim: int, *, seed: int, std: float, dtype: str = "float32",
              out: np.ndarray | None = None) -> np.ndarray:
    """Initial values of global rows ``[start, stop)``: ``[stop-start, dim]`` in ``dtype``."""
    if not 0 <= start <= stop:
        raise ValueError(f"init_rows: bad row range [{start}, {stop})")
    dt = numpy_dtype(dtype)
    if out is None:
        out = np.empty((stop - start, dim), dtype=dt)
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        b0 = block * INIT_BLOCK_ROWS
        lo, hi = max(start, b0), min(stop, b0 + INIT_BLOCK_ROWS)
        rng = np.random.default_rng([seed, block])
        # Always draw the whole block, so a row's values never depend on where a range ends.
        vals = rng.standard_normal((INIT_BLOCK_ROWS, dim), dtype=np.float32)
        if std != 1.0:
            vals *= np.float32(std)
        out[lo - start: hi - start] = vals[lo - b0: hi - b0].astype(dt, copy=False)
    return out
