"""numpy arrays <-> ``engram.v1.Array``: raw little-endian bytes plus dtype and shape."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from ..config import STORE_DTYPES
from ..core.dtypes import numpy_dtype
from ..errors import InvalidRequest
from .generated import engram_pb2 as pb

__all__ = ["encode", "decode", "wire_dtype", "WIRE_DTYPES"]

WIRE_DTYPES = ("int64", *STORE_DTYPES)


@functools.cache  # per lookup, on both ends: a dtype built afresh costs more than the lookup's checks
def wire_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wire dtype name (little-endian)."""
    if name == "int64":
        return np.dtype("<i8")
    return numpy_dtype(name).newbyteorder("<") if name != "bfloat16" else numpy_dtype(name)


@functools.cache
def _wire_name(dt: np.dtype) -> str | None:
    """``dt``'s wire name, None if it has none. Cached: ``dtype.name`` runs Python in numpy 2
    (~10 us with caches cold, as a lookup agent's are between decode steps)."""
    name = dt.name
    return name if name in WIRE_DTYPES else None


def encode(arr: np.ndarray, dtype: str | None = None) -> pb.Array:
    """Wrap ``arr`` (converted to ``dtype`` if given) without copying more than once."""
    name = dtype or _wire_name(arr.dtype)
    if name is None:
        raise InvalidRequest(f"cannot send dtype {arr.dtype}; expected one of {', '.join(WIRE_DTYPES)}")
    a = np.ascontiguousarray(arr, dtype=wire_dtype(name))
    return pb.Array(dtype=name, shape=a.shape, data=a.tobytes())


def decode(msg: pb.Array, *, what: str, dtypes: Sequence[str], ndim: int,
           max_elements: int | None = None) -> np.ndarray:
    """Validate and view ``msg`` as an array (read-only, no copy).

    Raises :class:`InvalidRequest` naming ``what`` for an unexpected dtype or rank, negative
    dims, or a byte length that does not match the shape (truncated or padded data).
    """
    if msg.dtype not in dtypes:
        raise InvalidRequest(f"{what}: dtype {msg.dtype!r}; expected {' or '.join(dtypes)}")
    shape = tuple(msg.shape)
    if len(shape) != ndim:
        raise InvalidRequest(f"{what}: shape {list(shape)} has {len(shape)} dims; expected {ndim}")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{what}: shape {list(shape)} has a negative dimension")
    n = math.prod(shape)  # exact: np.prod in int64 wraps, and a huge shape would pass as 0
    if max_elements is not None and n > max_elements:
        raise InvalidRequest(f"{what}: {n} elements exceed the limit of {max_elements}")
    dt = wire_dtype(msg.dtype)
    if len(msg.data) != n * dt.itemsize:
        raise InvalidRequest(f"{what}: {len(msg.data)} bytes for shape {list(shape)} of {msg.dtype}; "
                             f"expected {n * dt.itemsize} (truncated or padded data)")
    return np.frombuffer(msg.data, dtype=dt).reshape(shape)
