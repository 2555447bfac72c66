"""Table layout: one global row space over all Engram layers, orders and heads, and its
split into contiguous shard ranges.

Rows are concatenated in hashing order (layer in ``layer_ids`` order, then order n, then
head), so a row id is ``offset[layer, head] + head_id`` and every machine computes the same
ids from the same config and vocabulary. The fingerprint hashes everything that moves an id
or changes a shape; a shard refuses requests that carry another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..config import STORE_DTYPE_BYTES, EngramConfig, store_dtype
from .dtypes import FP8, row_width
from .hashing import head_primes

__all__ = ["TableLayout", "ShardPlan", "DTYPE_BYTES", "dtype_bytes"]

#: Storage dtypes and their widths (defined once, in :mod:`engram_ray.config`).
DTYPE_BYTES: Mapping[str, int] = STORE_DTYPE_BYTES


def dtype_bytes(dtype: str) -> tuple[str, int]:
    """Canonical storage dtype name and its width, accepting ``bf16``-style aliases."""
    name = store_dtype(dtype)
    return name, DTYPE_BYTES[name]


@dataclass(frozen=True)
class TableLayout:
    """Where every (layer, order, head) table lives in the global row space."""

    layer_ids: tuple[int, ...]
    #: Per layer, the head table sizes (primes) flattened in (order, head) order.
    head_sizes: tuple[tuple[int, ...], ...]
    max_ngram_size: int
    n_head_per_ngram: int
    row_dim: int
    seed: int
    #: The compressed vocabulary the ids are hashed from (its size sets the multipliers).
    compressed_vocab_size: int
    compressed_pad_id: int
    vocab_digest: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(int(x) for x in self.layer_ids))
        object.__setattr__(self, "head_sizes",
                           tuple(tuple(int(p) for p in hs) for hs in self.head_sizes))
        heads = (self.max_ngram_size - 1) * self.n_head_per_ngram
        if len(self.head_sizes) != len(self.layer_ids) or any(len(h) != heads for h in self.head_sizes):
            raise ValueError(f"TableLayout: head_sizes must hold {heads} sizes for each of "
                             f"{len(self.layer_ids)} layers")
        if self.row_dim < 1:
            raise ValueError(f"TableLayout.row_dim={self.row_dim}: expected >= 1")

    @classmethod
    def build(cls, config: EngramConfig, vocab: Any) -> TableLayout:
        """Layout for ``config`` hashed over a :class:`CompressedVocab` ``vocab``."""
        primes = head_primes(config)
        return cls(
            layer_ids=config.layer_ids,
            head_sizes=tuple(tuple(p for order in primes[layer] for p in order) for layer in config.layer_ids),
            max_ngram_size=config.max_ngram_size,
            n_head_per_ngram=config.n_head_per_ngram,
            row_dim=config.row_dim,
            seed=config.seed,
            compressed_vocab_size=vocab.size,
            compressed_pad_id=vocab.compress_id(config.pad_id),
            vocab_digest=vocab.digest,
        )

    # Sizes ------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """Heads per layer, (N-1) x K."""
        return len(self.head_sizes[0])

    @cached_property
    def offsets(self) -> np.ndarray:
        """``[L, H]`` int64 (read-only): first global row of each (layer, head) table."""
        sizes = np.array(self.head_sizes, dtype=np.int64).ravel()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).reshape(len(self.layer_ids), -1)
        starts.flags.writeable = False
        return starts

    @cached_property  # read per lookup (the ids' bounds check): summed once
    def layer_rows(self) -> tuple[int, ...]:
        """Rows per Engram layer."""
        return tuple(sum(h) for h in self.head_sizes)

    @cached_property
    def total_rows(self) -> int:
        return sum(self.layer_rows)

    @property
    def num_params(self) -> int:
        return self.total_rows * self.row_dim

    def nbytes(self, dtype: str = "float32") -> int:
        """Bytes of the whole table stored as ``dtype``."""
        return self.total_rows * self.row_bytes(dtype)

    def storage_dtypes(self) -> tuple[str, ...]:
        """The storage dtypes this table's rows can take (FP8 needs rows of a multiple of 32)."""
        return tuple(d for d in DTYPE_BYTES if d != FP8 or self.row_dim % 32 == 0)

    def row_bytes(self, dtype: str = "float32") -> int:
        """Bytes of one stored row: ``row_dim`` values, or an FP8 row's codes and scales."""
        name, width = dtype_bytes(dtype)
        return row_width(name, self.row_dim) * width

    # Ids --------------------------------------------------------------------------------
    def layer_index(self, layer_id: int) -> int:
        try:
            return self.layer_ids.index(layer_id)
        except ValueError:
            raise ValueError(f"TableLayout: layer_id={layer_id} is not an Engram layer; "
                             f"Engram layers are {list(self.layer_ids)}") from None

    def row_ids(self, layer_id: int, head_ids_bth: np.ndarray) -> np.ndarray:
        """Global rows of one layer's head ids ``[..., H]`` (from ``NgramHasher.hash``)."""
        return head_ids_bth + self.offsets[self.layer_index(layer_id)]

    def row_ids_stacked(self, head_ids_lbth: np.ndarray) -> np.ndarray:
        """Global rows of ``[L, ..., H]`` head ids (from ``NgramHasher.hash_stacked``)."""
        off = self.offsets
        return head_ids_lbth + off.reshape(off.shape[0], *([1] * (head_ids_lbth.ndim - 2)), off.shape[1])

    # Identity ---------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """``engram-<16 hex>``: changes whenever anything that moves an id or a shape does."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "engram-" + hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["layer_ids"] = list(self.layer_ids)
        d["head_sizes"] = [list(h) for h in self.head_sizes]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableLayout:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TableLayout: unknown key(s) {', '.join(map(repr, unknown))}")
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"TableLayout: missing key(s) {', '.join(map(repr, missing))}")
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """What a user wants to see before deploying: rows, parameters, sizes, fingerprint."""
        return {
            "fingerprint": self.fingerprint,
            "layers": list(self.layer_ids),
            "orders": list(range(2, self.max_ngram_size + 1)),
            "heads_per_order": self.n_head_per_ngram,
            "row_dim": self.row_dim,
            "rows": self.total_rows,
            "rows_per_layer": list(self.layer_rows),
            "params": self.num_params,
            "bytes": {d: self.nbytes(d) for d in self.storage_dtypes()},
            "compressed_vocab_size": self.compressed_vocab_size,
            "vocab_digest": self.vocab_digest,
        }


@dataclass(frozen=True)
class ShardPlan:
    """``num_shards`` contiguous ranges of ``total_rows`` that differ in size by at most one
    row: shard ``s`` owns ``[s*R//S, (s+1)*R//S)``."""

    total_rows: int
    num_shards: int

    def __post_init__(self) -> None:
        if self.total_rows < 1:
            raise ValueError(f"ShardPlan.total_rows={self.total_rows}: expected >= 1")
        if not 1 <= self.num_shards <= self.total_rows:
            raise ValueError(f"ShardPlan.num_shards={self.num_shards}: expected between 1 and "
                             f"the table's {self.total_rows} rows")

    @cached_property
    def bounds(self) -> np.ndarray:
        """``[S+1]`` int64 (read-only) shard boundaries; shard s owns ``bounds[s]:bounds[s+1]``."""
        # Python ints: s*R would overflow int64 for very large tables.
        b = np.array([s * self.total_rows // self.num_shards for s in range(self.num_shards + 1)],
                     dtype=np.int64)
        b.flags.writeable = False
        return b

    def shard_range(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"ShardPlan: shard={shard}: expected 0..{self.num_shards - 1}")
        b = self.bounds
        return int(b[shard]), int(b[shard + 1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard index and local row of every global row (any shape), vectorised."""
        r = np.asarray(rows)
        if r.dtype.kind not in "iu":
            raise ValueError(f"ShardPlan: row ids must be integers, got dtype {r.dtype}")
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= self.total_rows):
            bad = int(r.min()) if r.min() < 0 else int(r.max())
            raise ValueError(f"ShardPlan: row id {bad} is outside the table's "
                             f"{self.total_rows} rows")
        b = self.bounds
        shard = np.searchsorted(b, r, side="right") - 1
        return shard, r - b[shard]

    def partition(self, rows: np.ndarray) -> list[np.ndarray]:
        """For 1-D ``rows``, the positions that fall in each shard (one array per shard)."""
        shard, _ = self.locate(rows)
        order = np.argsort(shard, kind="stable")
        counts = np.bincount(shard, minlength=self.num_shards)
        return np.split(order, np.cumsum(counts)[:-1])
