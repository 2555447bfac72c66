"""``EngramClient``: rows by global id from a sharded memory service, fetched ahead of need.

The facade over the parts of :mod:`engram_ray.client`: it checks what the caller hands over and
gives it to the client's I/O thread (:class:`~.iothread.IoThread`), where :class:`~.transfers.Transfers`
plans, calls and reassembles. ``prefetch`` returns in tens of microseconds; ``Prefetch.result()``
waits for the rows, in the caller's order. The asyncio forms await the same futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from ..core.dtypes import row_values, row_width
from ..core.layout import ShardPlan, TableLayout
from ..rpc import codec, wire
from ..rpc.generated import engram_pb2 as pb
from . import plan, shards
from .cache import DEFAULT_POLICY, RowCache, check_cache_bytes
from .calls import ShardCalls
from .iothread import IoThread, shutdown
from .replicas import ReplicaSet, Resolver, SyncStubs, channel_options
from .stats import ClientStats
from .streams import LookupStreams
from .transfers import Prefetch, Transfers, UniqueRows

__all__ = ["EngramClient"]

def _policy(name: str, doc: str) -> property:
    """An attribute of the client that its calls read (``timeout``, ``retries``, ...)."""
    return property(lambda self: getattr(self._calls, name), lambda self, v: setattr(self._calls, name, v), doc=doc)


def _close_direct(streams: LookupStreams, stubs: SyncStubs) -> None:
    """The direct path's streams, then the channels they run on."""
    streams.close()
    stubs.close()


class EngramClient:
    """Client of a memory service: ``addresses[i]`` serves shard ``i`` of ``layout`` (or is
    the list of the addresses of its copies).

    ``timeout`` is per message, ``retries`` the attempts after the first for lookups,
    ``chunk_bytes`` the target size of one response (see :class:`~.plan.MessageSizes`).
    ``token``: the service's secret (``MemoryService.client()`` passes it). ``tls_ca``: PEM of
    the CA that signed the shards' certificates, for a TLS service (``tls_server_name``
    overrides the name checked). ``resolver``: returns the shards' current addresses; when a
    shard stays unavailable after the retries, the client asks it (a restarted shard may serve
    elsewhere) and keeps trying for up to ``recover_timeout`` seconds before raising
    :class:`~engram_ray.errors.ShardUnavailable`. ``cache_bytes``: keep the hottest rows here,
    in about that many bytes (:class:`~.cache.RowCache`, ``cache_policy`` "lru" or "tinylfu"):
    a lookup then asks the shards only for the rest. This client never serves a row older
    than its own acknowledged push; rows another writer changed are dropped when a lookup's
    answer shows their shard's rows version moved, and a cached row is served only while its
    shard has answered within ``cache_max_age_s`` (see the README's cache contract).
    """

    timeout = _policy("timeout", "Seconds per message.")
    retries = _policy("retries", "Attempts after the first, with backoff.")
    backoff = _policy("backoff", "Seconds before the first retry (doubling after).")
    recover_timeout = _policy("recover_timeout", "Seconds to wait for a shard through the resolver.")

    def __init__(self, addresses: Sequence[Any], layout: TableLayout, *, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.05,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes: int = 1 << 20,
                 connect_timeout: float = 10.0, token: str | None = None,
                 tls_ca: bytes | None = None, tls_server_name: str | None = None,
                 resolver: Resolver | None = None, recover_timeout: float = 60.0,
                 cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY, cache_max_age_s: float = 1.0):
        if cache_bytes:
            check_cache_bytes(cache_bytes)  # before any connection: a bad size fails at once
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
        self._replicas = ReplicaSet(addresses, channel_options(max_message_bytes, tls_server_name), creds)
        self._sync = SyncStubs(channel_options(max_message_bytes, tls_server_name), creds)
        self.layout = layout
        self.plan = ShardPlan(layout.total_rows, self._replicas.num_shards)
        self._stats = ClientStats()
        self._calls = ShardCalls(self._replicas, timeout=timeout, retries=retries, backoff=backoff,
                                 metadata=wire.auth_metadata(token), resolver=resolver,
                                 recover_timeout=recover_timeout, count=self._stats.count)
        self._io = IoThread(name=f"engram-client-{id(self):x}")
        # A client dropped without close() still stops its thread when collected.
        self._finalizer = weakref.finalize(self, shutdown, self._io, self._replicas.channels)
        # a lookup agent's direct lookups: a stream per shard kept open, over the sync channels
        self._streams = LookupStreams(self._sync, wire.auth_metadata(token))
        self._sync_finalizer = weakref.finalize(self, _close_direct, self._streams, self._sync)
        try:
            self._io.run(self._replicas.open())
            # Describe every copy; per shard, reads go to the first that answers (see .shards).
            answers = self._io.run(self._calls.each(self._replicas.where(every_replica=True), "Describe",
                                                    pb.DescribeRequest(), connect_timeout, wait_for_ready=True))
            self.shards = shards.connected(self._replicas, answers, layout, self.plan)
        except BaseException:
            self.close()
            raise
        self.dtype_name = self.shards[0].dtype
        self.dtype = codec.wire_dtype(self.dtype_name)
        #: Stored elements per row: row_dim, or an FP8 row's packed bytes (see :meth:`values`).
        self.width = row_width(self.dtype_name, layout.row_dim)
        sizes = plan.MessageSizes.for_shards(self.shards, max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes,
                                             row_dim=self.width, row_itemsize=self.dtype.itemsize)
        try:
            cache = (RowCache.for_bytes(int(cache_bytes), self.width, self.dtype, policy=cache_policy)
                     if cache_bytes else None)
        except BaseException:
            self.close()
            raise
        self._transfers = Transfers(self._calls, layout, self.plan, sizes, self.dtype_name, self._stats, cache,
                                    cache_max_age_s)

    @property
    def max_rows_per_message(self) -> int:
        """Rows in one lookup message, fitted to this client's and every shard's limits."""
        return self._transfers.sizes.lookup_rows

    @property
    def replicas(self) -> list[list[str]]:
        """Per shard, the addresses of its copies (one for an unreplicated service)."""
        return self._replicas.replicas

    @property
    def addresses(self) -> list[str]:
        """Per shard, the address of the copy reads go to now (it moves on failover)."""
        return self._replicas.addresses

    def close(self) -> None:
        """Close the channels and stop the I/O thread (idempotent)."""
        self._sync_finalizer()
        self._finalizer()

    def __enter__(self) -> EngramClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Lookups -------------------------------------------------------------------------------
    def prefetch(self, row_ids: Any) -> Prefetch:
        """Start fetching the rows of ``row_ids`` (any shape); returns at once."""
        return self.prefetch_many([row_ids])[0]

    def prefetch_many(self, row_ids: Sequence[Any]) -> list[Prefetch]:
        """:meth:`prefetch` for several arrays (e.g. one per Engram layer), in the order given, with
        one hand-over to the I/O thread (each wake-up costs the caller a syscall and a GIL trip)."""
        return self._start(row_ids, "rows", None, unique=False)

    def prefetch_unique(self, row_ids: Any, rows_out: np.ndarray | None = None) -> Prefetch[UniqueRows]:
        """Start fetching ``row_ids`` as :class:`UniqueRows` (each distinct row once + the inverse,
        to move rows once and expand them where used), into ``rows_out[:U]`` if given."""
        return self.prefetch_unique_many([row_ids], None if rows_out is None else [rows_out])[0]

    def prefetch_unique_many(self, row_ids: Sequence[Any], rows_outs: Sequence[np.ndarray | None] | None = None,
                             *, ordered: bool = False) -> list[Prefetch[UniqueRows]]:
        """:meth:`prefetch_unique` for several arrays, with one hand-over to the I/O thread;
        ``ordered``: each lookup goes out once the one before it has its rows."""
        return self._start(row_ids, "unique", rows_outs, unique=True, ordered=ordered)

    def lookup_unique_now(self, row_ids: Any, rows_out: np.ndarray | None = None) -> UniqueRows | None:
        """:meth:`prefetch_unique`'s rows, looked up on the calling thread in at most 0.5 s -- a
        message on the shard's LookupStream (:mod:`.streams`), or one blocking call where no
        stream serves -- where that is one message to one shard and the client keeps no cache;
        None where it is not, or where that one try failed in any way (then ask
        :meth:`prefetch_unique`: it retries, fails over and raises what went wrong). Ids that
        are not rows of the table raise :class:`InvalidRequest`. For a lookup agent's ordered
        lookups: no hand-over to the I/O thread nor asyncio (0.2-0.5 ms of a ~1.3 ms lookup on
        a shared core). The caller's thread blocks meanwhile."""
        [(flat, shape)], [buf] = plan.lookups([row_ids], None if rows_out is None else [rows_out], self.layout,
                                              self.dtype, True, self.width)
        r = self._transfers.unique_now(flat, shape, buf, self._sync, self._streams)
        if r is not None:
            self._stats.count("lookups", 1)
            self._stats.count("lookups_direct", 1)
            self._stats.count("ids", int(flat.size))
        return r

    def prefetch_into(self, row_ids: Any, out: np.ndarray) -> Prefetch[np.ndarray]:
        """Start fetching ``row_ids`` into the caller's ``out`` (``[*ids.shape, dim]`` or ``[N, dim]``,
        C-contiguous, storage dtype), in the caller's order (as Mooncake's ``lookup_into``)."""
        return self._start([row_ids], "rows", [out], unique=False)[0]

    def lookup_into(self, row_ids: Any, out: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """:meth:`prefetch_into` and wait: returns ``out`` itself."""
        self.prefetch_into(row_ids, out).result(timeout)
        return out

    def _start(self, row_ids: Sequence[Any], kind: str, outs: Sequence[np.ndarray | None] | None,
               unique: bool, ordered: bool = False) -> list[Prefetch]:
        """Check ids and output buffers, then hand every lookup to the I/O thread at once."""
        checked, bufs = plan.lookups(row_ids, outs, self.layout, self.dtype, unique, self.width)
        items: list[tuple[np.ndarray, tuple[int, ...], Prefetch]] = [
            (flat, shape, Prefetch(int(flat.size))) for flat, shape in checked]
        self._stats.count("lookups", len(items))
        self._stats.count("ids", sum(int(f.size) for f, _, _ in items))
        self._io.submit(self._transfers.start(items, kind, bufs, ordered))
        return [p for _, _, p in items]

    def lookup(self, row_ids: Any, timeout: float | None = None) -> np.ndarray:
        """Rows ``[*row_ids.shape, width]`` as stored (FP8: packed bytes; :meth:`values`)."""
        return self.prefetch(row_ids).result(timeout)

    def values(self, rows: np.ndarray) -> np.ndarray:
        """Looked-up rows as float32 ``[..., row_dim]`` (FP8 dequantised, exactly)."""
        return row_values(rows, self.dtype_name, self.layout.row_dim)

    async def alookup(self, row_ids: Any) -> np.ndarray:
        """:meth:`lookup` for callers in an event loop."""
        return await self.prefetch(row_ids)

    # Training ------------------------------------------------------------------------------
    def push_gradients(self, row_ids: Any, grads: Any, timeout: float | None = None, *,
                       lr: float | None = None) -> int:
        """Send row gradients ``[*ids.shape, dim]`` to their shards (duplicates summed here),
        applied at ``lr`` (a trainer's schedule; None: the rate the shards were deployed with);
        returns the number of distinct rows updated."""
        return self.submit_push(row_ids, grads, lr=lr).result(timeout)

    def submit_push(self, row_ids: Any, grads: Any, *, lr: float | None = None) -> concurrent.futures.Future[int]:
        """:meth:`push_gradients` without waiting: a future of the number of rows updated (for
        a caller, like the lookup agent, that must not block its thread on a push)."""
        ids, flat = plan.flat_ids(row_ids, self.layout.total_rows)
        g = plan.check_grads(ids.shape, grads, self.layout.row_dim)
        plan.check_lr(lr)
        return self._io.submit(self._transfers.push(flat, g, lr))

    async def apush_gradients(self, row_ids: Any, grads: Any, *, lr: float | None = None) -> int:
        """:meth:`push_gradients` for callers in an event loop."""
        return await asyncio.wrap_future(self.submit_push(row_ids, grads, lr=lr))

    # Service calls --------------------------------------------------------------------------
    def describe(self, tolerate: bool = False, every_replica: bool = False) -> list[dict[str, Any]]:
        """Every shard's Describe (of its read copy, or every copy) as dicts; ``tolerate``: a
        copy that does not answer gives a dict with its ``error``."""
        where = self._replicas.where(every_replica)
        answers = self._io.run(self._calls.each(where, "Describe", pb.DescribeRequest(), self.timeout))
        return shards.describe_dicts(where, answers, self.replicas, self._calls.error, tolerate)

    def save(self, directory: str) -> list[str]:
        """Ask every shard to write its part of a checkpoint into ``directory`` (one replica
        each); with ``directory=""`` every replica writes a recovery checkpoint."""
        where = self._replicas.where(every_replica=not directory)
        answers = self._io.run(self._calls.each(where, "Save", pb.SaveRequest(directory=str(directory)),
                                                max(self.timeout, 600)))
        self._calls.raise_failed(where, answers)
        return [r.header_path for r in answers]

    def stats(self) -> dict[str, Any]:
        """Requests, ids, dedup, bytes, retries, errors, latency, I/O-thread seconds (:mod:`.stats`),
        and the row cache's hits, misses, fill and evictions (``cache``: None without one)."""
        cache = self._transfers.cache
        return {**self._stats.report(), "cache": cache.report() if cache is not None else None}

