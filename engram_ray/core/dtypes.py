"""numpy dtypes of the storage dtype names (:data:`engram_ray.config.STORE_DTYPES`).

Here, below both the store and the wire codec, so a client can read rows off the wire without
importing the store that keeps them.
"""

from __future__ import annotations

import numpy as np

from ..config import STORE_DTYPES

__all__ = ["numpy_dtype", "row_width", "row_values", "FP8"]

#: The packed FP8 storage dtype (core/fp8.py): uint8 rows of row_width(FP8, D) bytes.
FP8 = "fp8_e4m3"


def numpy_dtype(name: str) -> np.dtype:
    """float32 / float16 natively; bfloat16 through ml_dtypes (numpy has none); FP8 rows as
    their packed bytes (uint8)."""
    if name == "float32":
        return np.dtype(np.float32)
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if name == FP8:
        return np.dtype(np.uint8)
    raise ValueError(f"storage dtype {name!r}: expected one of {', '.join(STORE_DTYPES)}")


def row_width(dtype: str, row_dim: int) -> int:
    """Stored elements per row: ``row_dim``, or for FP8 its packed bytes (codes + scales)."""
    if dtype == FP8:
        from .fp8 import fp8_row_bytes
        return fp8_row_bytes(row_dim)
    return row_dim


def row_values(rows: np.ndarray, dtype: str, row_dim: int) -> np.ndarray:
    """Stored rows ``[..., row_width]`` as float32 values ``[..., row_dim]``: FP8 rows
    dequantised (exact), the others widened."""
    if dtype != FP8:
        return np.asarray(rows).astype(np.float32)
    from .fp8 import dequantize_packed

    r = np.asarray(rows)
    return dequantize_packed(r.reshape(-1, r.shape[-1]), row_dim).reshape(*r.shape[:-1], row_dim)
