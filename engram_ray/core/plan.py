"""Capacity planning: how many memory nodes and shards a table needs, and what it asks of
the network. Every figure derives from a :class:`~engram_ray.core.layout.TableLayout`.

What a shard holds: its rows in the storage dtype, plus, when it trains, the optimiser's
state beside them (Adam: m and v in float32 and a step count per row, as
:class:`~engram_ray.core.optim.SparseOptimizer` keeps them). A node gives the shards
``(1 - headroom)`` of its RAM; the rest is for the OS, Ray's object store and gRPC buffers.
The same :func:`shard_bytes` sizes the plan's shards and what ``deploy`` reserves per shard
(:func:`shard_gib` of :data:`MEMORY_GIB_RESOURCE`): one formula for both.

What a token costs on the wire: each Engram layer looks up ``heads_per_layer`` rows per
token. A batch's ids repeat (common n-grams), and the client fetches each distinct row once,
so the bytes scale with the dedup ratio (distinct / all ids; ~0.5 measured on code text).
A lookup sends 8-byte ids and gets rows back; training also pushes float32 gradients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import StoreConfig
from .dtypes import row_width
from .layout import TableLayout, dtype_bytes

__all__ = ["CapacityPlan", "MEMORY_GIB_RESOURCE", "MEMORY_RESOURCE", "bytes_per_row", "optimizer_state_bytes_per_row",
           "plan_capacity", "resident_rows_per_shard", "shard_bytes", "shard_gib"]

GIB = 2**30

#: Ray custom resource that marks memory nodes: one unit per shard slot. The cluster files
#: (cluster/*.yaml, which cannot import it) spell the same name; a test checks they do.
MEMORY_RESOURCE = "engram_memory"
#: Ray custom resource counting the GiB a memory node gives shards: shards are packed by it.
MEMORY_GIB_RESOURCE = "engram_memory_gib"


def optimizer_state_bytes_per_row(kind: str, dim: int) -> int:
    """Bytes of optimiser state kept per row: Adam m and v (float32) and a step (int64)."""
    if kind == "adam":
        return 2 * 4 * dim + 8
    if kind in ("sgd", "none"):
        return 0
    raise ValueError(f"optimizer {kind!r}: expected adam, sgd or none")


def bytes_per_row(row_dim: int, dtype: str, optimizer: str) -> int:
    """Bytes one resident row takes in a shard: the row in its storage dtype and the
    optimiser's state beside it."""
    name, width = dtype_bytes(dtype)
    return row_width(name, row_dim) * width + optimizer_state_bytes_per_row(optimizer, row_dim)


def shard_bytes(layout: TableLayout, num_shards: int, *, dtype: str, optimizer: str,
                resident_rows_per_shard: int = 0) -> int:
    """Bytes of rows and optimiser state one of ``num_shards`` shards holds (the largest:
    shard ranges differ by at most one row); a resident cap bounds its rows."""
    rows = -(-layout.total_rows // num_shards)
    if resident_rows_per_shard:
        rows = min(rows, resident_rows_per_shard)
    return rows * bytes_per_row(layout.row_dim, dtype, optimizer)


def shard_gib(layout: TableLayout, store: StoreConfig, num_shards: int) -> int:
    """Whole GiB one shard reserves of a node's ``engram_memory_gib`` (see
    :data:`MEMORY_GIB_RESOURCE`): :func:`shard_bytes` for ``store``, rounded up, at least 1."""
    need = shard_bytes(layout, num_shards, dtype=store.dtype, optimizer=store.optimizer.kind,
                       resident_rows_per_shard=store.resident_rows_per_shard)
    return max(1, -(-need // GIB))


def resident_rows_per_shard(layout: TableLayout, dtype: str, num_shards: int, max_resident_gib: float) -> int:
    """Benchmarks: the ``StoreConfig.resident_rows_per_shard`` that keeps the whole table's
    rows (``dtype``, optimiser state not counted) within ``max_resident_gib``, split evenly
    over the shards; 0 (no cap) when every row fits."""
    if max_resident_gib <= 0:
        raise ValueError(f"max_resident_gib={max_resident_gib}: expected a positive size in GiB")
    per_shard = max(1, int(max_resident_gib * GIB // layout.row_bytes(dtype) // num_shards))
    return per_shard if per_shard * num_shards < layout.total_rows else 0


@dataclass(frozen=True)
class CapacityPlan:
    """The answer of :func:`plan_capacity` (all sizes in bytes unless named GiB)."""

    table_params: int
    table_rows: int
    row_dim: int
    dtype: str
    optimizer: str
    replicas: int
    table_bytes: int            # rows only, one copy
    resident_bytes: int         # rows + optimiser state, all replicas
    node_ram_gib: float
    headroom: float
    usable_gib_per_node: float
    shards: int                 # per replica
    shards_per_node: int
    memory_nodes: int
    shard_gib: float            # rows + state of one shard
    gib_per_node: float         # what the fullest node holds
    free_gib_per_node: float    # of its RAM, after the shards (headroom included)
    ids_per_token: int
    dedup_ratio: float
    lookup_bytes_per_token: float   # ids out + rows back, after dedup
    push_bytes_per_token: float     # ids + float32 gradients, when training
    tokens_per_s: float
    lookup_gbit_per_s: float        # per GPU worker at tokens_per_s
    train_gbit_per_s: float         # lookups + pushes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ray_resources(self) -> dict[str, float]:
        """Custom resources each memory node should declare (see cluster/)."""
        return {MEMORY_RESOURCE: self.shards_per_node, MEMORY_GIB_RESOURCE: math.floor(self.usable_gib_per_node)}


def plan_capacity(layout: TableLayout, *, dtype: str = "bfloat16", node_ram_gib: float = 512.0,
                  headroom: float = 0.2, optimizer: str = "none", replicas: int = 1,
                  shards: int | None = None, shards_per_node: int = 4, dedup_ratio: float = 1.0,
                  tokens_per_s: float = 10_000.0) -> CapacityPlan:
    """Memory nodes, shards and bandwidth for ``layout``.

    ``shards``: fix the shard count (per replica); by default ``shards_per_node`` per node
    (several shard processes per node gather and encode in parallel). ``dedup_ratio``: 1.0
    plans for the worst case (no repeated n-grams in a batch).
    """
    name, width = dtype_bytes(dtype)
    if node_ram_gib <= 0:
        raise ValueError(f"node_ram_gib={node_ram_gib}: expected a positive size")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom}: expected a fraction in [0, 1)")
    if replicas < 1:
        raise ValueError(f"replicas={replicas}: expected 1 or more")
    if shards is not None and shards < 1:
        raise ValueError(f"shards={shards}: expected 1 or more")
    if shards_per_node < 1:
        raise ValueError(f"shards_per_node={shards_per_node}: expected 1 or more")
    if not 0 < dedup_ratio <= 1:
        raise ValueError(f"dedup_ratio={dedup_ratio}: expected a fraction in (0, 1]")
    if tokens_per_s < 0:
        raise ValueError(f"tokens_per_s={tokens_per_s}: expected >= 0")
    dim, rows = layout.row_dim, layout.total_rows
    one_copy = rows * bytes_per_row(dim, name, optimizer)
    usable = node_ram_gib * (1 - headroom) * GIB
    if shards is None:
        # the fewest nodes that hold every copy, each running shards_per_node shards
        nodes = max(replicas, math.ceil(replicas * one_copy / usable))
        shards = max(1, math.ceil(nodes * shards_per_node / replicas))
    one_shard = shard_bytes(layout, shards, dtype=name, optimizer=optimizer)
    if one_shard > usable:
        raise ValueError(f"one shard needs {one_shard / GIB:.1f} GiB but a node gives shards "
                         f"{usable / GIB:.1f} GiB ({node_ram_gib:g} GiB less {headroom:.0%} headroom): "
                         "use more shards or larger nodes")
    fit = min(shards_per_node, int(usable // one_shard))  # shards one node can hold
    # replicas of a shard go to different nodes, so a node holds at most one copy of each
    nodes = max(replicas, math.ceil(shards * replicas / fit))
    on_fullest = math.ceil(shards * replicas / nodes)
    ids_per_token = len(layout.layer_ids) * layout.num_heads
    distinct = ids_per_token * dedup_ratio
    lookup = distinct * (8 + row_width(name, dim) * width)  # FP8: a row's codes and scales
    push = distinct * (8 + dim * 4)
    return CapacityPlan(
        table_params=layout.num_params, table_rows=rows, row_dim=dim, dtype=name, optimizer=optimizer,
        replicas=replicas, table_bytes=rows * row_width(name, dim) * width, resident_bytes=replicas * one_copy,
        node_ram_gib=node_ram_gib, headroom=headroom, usable_gib_per_node=usable / GIB, shards=shards,
        shards_per_node=fit, memory_nodes=nodes, shard_gib=one_shard / GIB,
        gib_per_node=on_fullest * one_shard / GIB,
        free_gib_per_node=node_ram_gib - on_fullest * one_shard / GIB, ids_per_token=ids_per_token,
        dedup_ratio=dedup_ratio, lookup_bytes_per_token=lookup, push_bytes_per_token=push,
        tokens_per_s=tokens_per_s, lookup_gbit_per_s=lookup * tokens_per_s * 8 / 1e9,
        train_gbit_per_s=(lookup + push) * tokens_per_s * 8 / 1e9)
