"""Request planning, pure numpy: which ids go to which shard in which message, and how the
answers go back into the caller's shape. No gRPC here; the client sends what this plans.

A lookup deduplicates its ids (one batch of text repeats n-grams a lot), splits the sorted
unique ids by shard (shards own contiguous ranges, so this is a searchsorted), and cuts each
shard's part into messages under the size limit; the rows that come back are scattered into
the order and shape the caller gave. A push sums the gradients of duplicate ids first and is
cut the same way, by the size of its ids and float32 gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.optim import lr_error
from ..errors import InvalidRequest

__all__ = ["HEADROOM", "MessageSizes", "flat_ids", "check_grads", "check_lr", "dedup", "split", "scatter", "check_out",
           "out_rows", "lookups"]

#: Bytes a message holds beside its arrays: fields, framing, and room for a primary to wrap a
#: push for its backups.
HEADROOM = 4096
#: Below this, a shard's message limit leaves no room for rows: not a real shard.
MIN_SHARD_MESSAGE_BYTES = 8192
#: "No limit" on ids per message, for a shard that states none (max_ids_per_request 0).
NO_ID_LIMIT = 1 << 62


@dataclass(frozen=True)
class MessageSizes:
    """How large the messages to a set of shards may be: ``limit`` bytes, ``lookup_rows`` ids
    per lookup (its answer carries a row per id), ``push_rows`` distinct rows per push."""

    limit: int
    lookup_rows: int
    push_rows: int

    @classmethod
    def fit(cls, *, max_message_bytes: int, chunk_bytes: int, shard_message_bytes: Sequence[int],
            shard_max_ids: Sequence[int], row_dim: int, row_itemsize: int) -> MessageSizes:
        """Sizes under the client's and every shard's limits, aiming at ``chunk_bytes`` per
        answer: several ~1 MiB messages per shard are in flight at once, so a shard gathers
        the next while the last is on the wire (measured best here, against up to 40 % slower
        with one large message per shard)."""
        limit = min([max_message_bytes, chunk_bytes + HEADROOM, *shard_message_bytes])
        room = limit - HEADROOM
        # ids (8 B) are smaller than rows, except for very narrow rows
        lookup = max(1, min(min(shard_max_ids, default=NO_ID_LIMIT), room // max(8, row_dim * row_itemsize)))
        # an id (8 B) and a float32 gradient row per distinct row
        push = max(1, min(lookup, room // (8 + 4 * row_dim)))
        return cls(limit, lookup, push)

    @classmethod
    def for_shards(cls, shards: Sequence[Any], *, max_message_bytes: int, chunk_bytes: int, row_dim: int,
                   row_itemsize: int) -> MessageSizes:
        """:meth:`fit` to shards that described themselves (``max_message_bytes``,
        ``max_ids_per_request`` attributes, as :class:`~.shards.ShardInfo` has)."""
        return cls.fit(max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes,
                       shard_message_bytes=[s.max_message_bytes for s in shards],
                       shard_max_ids=[s.max_ids_per_request for s in shards],
                       row_dim=row_dim, row_itemsize=row_itemsize)


def flat_ids(row_ids: Any, total_rows: int, *, copy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(ids as given, flat int64 ids)``; :class:`InvalidRequest` if they are not rows of a
    table of ``total_rows``. ``copy``: the flat ids never share memory with the caller's."""
    ids = np.asarray(row_ids)
    if ids.dtype.kind not in "iu":
        raise InvalidRequest(f"row ids must be integers, got dtype {ids.dtype}")
    if ids.dtype.kind == "u" and ids.dtype.itemsize == 8 and ids.size and int(ids.max()) >= total_rows:
        # before int64 wraps it: 2**64 - 1 would read as -1
        raise InvalidRequest(f"row id {int(ids.max())} is outside the table's {total_rows} rows")
    flat = np.array(ids.reshape(-1), dtype=np.int64, copy=copy or None)
    # the ufuncs' own reduce: ndarray.min() goes through two Python layers (~10 us cold, per lookup)
    if flat.size and (np.minimum.reduce(flat) < 0 or np.maximum.reduce(flat) >= total_rows):
        bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
        raise InvalidRequest(f"row id {bad} is outside the table's {total_rows} rows")
    return ids, flat


def check_grads(ids_shape: tuple[int, ...], grads: Any, row_dim: int) -> np.ndarray:
    """Gradients ``[*ids_shape, row_dim]`` as float32 ``[n, row_dim]``; refused (nothing is
    sent) if of another shape or not finite."""
    g = np.asarray(grads, dtype=np.float32)
    if g.shape != ids_shape + (row_dim,):
        raise InvalidRequest(f"gradients have shape {g.shape}; expected {ids_shape + (row_dim,)} "
                             "(ids shape + row dim)")
    g = g.reshape(-1, row_dim)
    if not np.isfinite(g).all():
        raise InvalidRequest("gradients hold NaN or Inf; nothing was sent")
    return g


def dedup(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique ids and the inverse that rebuilds ``flat`` from them (None when ``flat``
    is already sorted and unique, e.g. deduplicated upstream: no gather needed)."""
    # np.unique's steps without its Python wrappers (this runs per lookup, with caches cold)
    if flat.size < 2 or np.logical_and.reduce(np.greater(flat[1:], flat[:-1])):
        return flat, None
    perm = flat.argsort()
    aux = flat[perm]
    first = np.empty(aux.size, dtype=bool)  # [N] where each distinct id first appears in aux
    first[0] = True
    np.not_equal(aux[1:], aux[:-1], out=first[1:])
    inverse = np.empty(flat.size, dtype=np.intp)
    inverse[perm] = np.add.accumulate(first, dtype=np.intp) - 1
    return aux[first], inverse


def split(uniq_sorted: np.ndarray, bounds: np.ndarray, step: int) -> list[tuple[int, int, int]]:
    """``(shard, a, b)``: slices ``[a, b)`` of the sorted ids, each within one shard (shard
    ``s`` owns ``[bounds[s], bounds[s+1])``) and at most ``step`` long, in order."""
    if step < 1:
        raise ValueError(f"split: step={step}; expected >= 1")
    cuts = np.searchsorted(uniq_sorted, bounds)
    out: list[tuple[int, int, int]] = []
    for s in range(len(bounds) - 1):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        out.extend((s, a, min(a + step, hi)) for a in range(lo, hi, step))
    return out


def scatter(uniq_rows: np.ndarray, inverse: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``[*shape, dim]`` in the caller's order, from the rows of the unique ids."""
    rows = uniq_rows if inverse is None else uniq_rows[inverse]
    return rows.reshape(*shape, uniq_rows.shape[-1])


def check_out(out: Any, n: int, row_dim: int, dtype: np.dtype) -> np.ndarray:
    """The first ``n`` rows of a caller-owned output buffer ``out [>= n, row_dim]`` (C-contiguous,
    of the rows' ``dtype``), to write rows into; :class:`InvalidRequest` if it cannot hold them."""
    if not isinstance(out, np.ndarray):
        raise InvalidRequest(f"output buffer must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype or out.ndim != 2 or out.shape[1] != row_dim or out.shape[0] < n:
        raise InvalidRequest(f"output buffer {out.dtype}{list(out.shape)} cannot hold {n} rows of "
                             f"{row_dim} {dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise InvalidRequest("output buffer must be C-contiguous and writeable")
    return out[:n]


def out_rows(out: Any, n: int, row_dim: int, dtype: np.dtype, unique: bool) -> np.ndarray:
    """A caller's output buffer as ``[rows, row_dim]``, checked where a bad buffer is the
    caller's error: for unique rows room for ``n``, else exactly ``n`` rows (``[*ids.shape,
    row_dim]`` is taken as its ``[n, row_dim]`` view)."""
    if not unique and isinstance(out, np.ndarray) and out.size == n * row_dim and out.flags.c_contiguous:
        out = out.reshape(n, row_dim)
    rows = check_out(out, n, row_dim, dtype)
    if not unique and out.shape[0] != n:
        raise InvalidRequest(f"output buffer holds {out.shape[0]} rows for {n} ids")
    return rows


def lookups(row_ids: Sequence[Any], outs: Sequence[Any] | None, layout: Any, dtype: np.dtype, unique: bool,
            width: int | None = None) -> tuple[list[tuple[np.ndarray, tuple[int, ...]]], list[np.ndarray | None]]:
    """Checked lookups: per id array its flat ids (a copy: another thread reads them later) and
    shape, and its output buffer as ``[rows, width]`` (None: the client allocates; ``width``:
    the stored row's elements, ``layout.row_dim`` unless the rows are packed FP8)."""
    width = layout.row_dim if width is None else width
    if outs is not None and len(outs) != len(row_ids):
        raise InvalidRequest(f"{len(outs)} output buffers for {len(row_ids)} id arrays")
    items, bufs = [], []
    for i, r in enumerate(row_ids):
        ids, flat = flat_ids(r, layout.total_rows, copy=True)
        out = outs[i] if outs is not None else None
        bufs.append(None if out is None else out_rows(out, int(flat.size), width, dtype, unique))
        items.append((flat, ids.shape))
    return items, bufs


def check_lr(lr: float | None) -> None:
    """A push's learning rate: None (the shards' own) or a rate ``config.lr_error`` accepts."""
    if lr is not None and lr_error(lr):
        raise ValueError(f"{lr_error(lr)} (or None: the rate the shards were deployed with)")
