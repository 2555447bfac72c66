"""numpy dtypes of the storage dtype names (:data:`engram_ray.config.STORE_DTYPES`).

Here, below both the store and the wire codec, so a client can read rows off the wire without
importing the store that keeps them.
"""

from __future__ import annotations

import numpy as np

from ..config import STORE_DTYPES

__all__ = ["numpy_dtype"]


def numpy_dtype(name: str) -> np.dtype:
    """float32 / float16 natively; bfloat16 through ml_dtypes (numpy has none)."""
    if name == "float32":
        return np.dtype(np.float32)
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"storage dtype {name!r}: expected one of {', '.join(STORE_DTYPES)}")
