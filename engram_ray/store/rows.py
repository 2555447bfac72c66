"""Storage dtypes of shard rows, and their deterministic initialisation (see
:mod:`engram_ray.core.rows`: a row depends only on its seed and id)."""

from __future__ import annotations

import hashlib

import numpy as np

from ..core.dtypes import FP8, numpy_dtype
from ..core.fp8 import fp8_row_bytes, quantize_packed
from ..core.rows import INIT_BLOCK_ROWS, init_rows_f32

__all__ = ["INIT_BLOCK_ROWS", "numpy_dtype", "init_rows", "sha256_hex"]

#: Rows quantised at a time for an FP8 table's initial rows (~40k rows/s on one core).
_FP8_BLOCK_ROWS = 1 << 15


def init_rows(start: int, stop: int, dim: int, *, seed: int, std: float, dtype: str = "float32",
              out: np.ndarray | None = None) -> np.ndarray:
    """Initial values of global rows ``[start, stop)``: ``[stop-start, dim]`` in ``dtype`` (FP8:
    the float32 rows quantised, packed ``[stop-start, row_width]``)."""
    if dtype == FP8:  # quantised a block of rows at a time: the float64 temporaries stay small
        if out is None:
            out = np.empty((stop - start, fp8_row_bytes(dim)), dtype=np.uint8)
        for a in range(start, stop, _FP8_BLOCK_ROWS):
            b = min(stop, a + _FP8_BLOCK_ROWS)
            out[a - start:b - start] = quantize_packed(init_rows_f32(a, b, dim, seed=seed, std=std))
        return out
    if out is None:
        out = np.empty((stop - start, dim), dtype=numpy_dtype(dtype))
    return init_rows_f32(start, stop, dim, seed=seed, std=std, out=out)


def sha256_hex(arr: np.ndarray) -> str:
    """sha256 of an array's bytes (C order), without copying a contiguous one: the checksum
    of a shard's rows and of every checkpoint file's payload."""
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8).data).hexdigest()
