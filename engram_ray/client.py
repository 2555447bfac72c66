"""``EngramClient``: rows by global id from a sharded memory service, fetched ahead of need.

A lookup deduplicates its ids (one batch of text repeats n-grams a lot), splits the unique
ids by shard (they are sorted, and shards own contiguous ranges, so this is a searchsorted),
cuts each shard's part into messages under the size limit, and issues every message at once
on persistent ``grpc.aio`` channels. All of that runs on the client's own I/O thread
(:class:`~engram_ray.rpc.iothread.IoThread`): :meth:`EngramClient.prefetch` checks the ids,
hands them over and returns in tens of microseconds, and ``Prefetch.result()`` waits for the
rows, already scattered back into the caller's order. The asyncio forms await the same
futures, so an event loop is never blocked.

Retries: lookups are retried on UNAVAILABLE and DEADLINE_EXCEEDED with backoff, then fail
with :class:`ShardUnavailable` naming the shard and address. Gradient pushes are not
idempotent, so they are retried only on UNAVAILABLE (the connection failed).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from .core.layout import ShardPlan, TableLayout
from .core.optim import sum_duplicates
from .errors import (AuthError, EngramError, FingerprintMismatch, InvalidRequest, RequestTooLarge,
                     ShardUnavailable)
from .rpc import codec
from .rpc.generated import engram_pb2 as pb
from .rpc.auth import BUSY, auth_metadata
from .rpc.generated import engram_pb2_grpc as pb_grpc
from .rpc.iothread import IoThread
from .config import STORE_DTYPES
from .rpc.codec import DEFAULT_MAX_MESSAGE_BYTES
from .rpc.replication import NOT_REPLICATED, PRIMARY_IS

__all__ = ["EngramClient", "Prefetch", "ShardInfo"]

log = logging.getLogger(__name__)

_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
           grpc.StatusCode.FAILED_PRECONDITION: FingerprintMismatch,
           grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLarge,
           grpc.StatusCode.UNAUTHENTICATED: AuthError}
_LOOKUP_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_PUSH_RETRY = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class ShardInfo:
    """What a shard said about itself when the client connected."""

    index: int
    address: str
    row_start: int
    row_stop: int
    dtype: str
    max_message_bytes: int
    max_ids_per_request: int


class Prefetch:
    """Rows on their way. ``result()`` (or ``await``) gives ``[*ids.shape, dim]``."""

    def __init__(self, num_ids: int):
        self._num_ids = num_ids
        self._future: concurrent.futures.Future | None = None
        #: Issue-to-arrival seconds, set on the I/O thread when the last response is in.
        self._seconds: float | None = None

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    @property
    def fetch_seconds(self) -> float | None:
        """Time from issue to the last response (None while in flight)."""
        return self._seconds

    def result(self, timeout: float | None = None) -> np.ndarray:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"lookup of {self._num_ids} ids: not complete after {timeout} s") from None

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()


class EngramClient:
    """Client of a memory service: ``addresses[i]`` serves shard ``i`` of ``layout``.

    ``timeout`` is per message, ``retries`` the attempts after the first for lookups,
    ``chunk_bytes`` the target size of one response (measured best at ~1 MiB here, against
    up to 40 % slower with one large message per shard). ``token``: the service's secret
    (``MemoryService.client()`` passes it). ``tls_ca``: PEM of the CA that signed the shards'
    certificates, for a TLS service (``tls_server_name`` overrides the name checked).
    ``resolver``: returns the shards' current addresses; when a shard stays unavailable after
    the retries, the client asks it (a restarted shard may serve elsewhere) and keeps trying
    for up to ``recover_timeout`` seconds before raising :class:`ShardUnavailable`.
    """

    def __init__(self, addresses: Sequence[str], layout: TableLayout, *, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.05,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes: int = 1 << 20,
                 connect_timeout: float = 10.0, token: str | None = None,
                 tls_ca: bytes | None = None, tls_server_name: str | None = None,
                 resolver: Callable[[], Sequence[str]] | None = None, recover_timeout: float = 60.0):
        if not addresses:
            raise ValueError("EngramClient: no shard addresses")
        #: Per shard, the addresses of its replicas (one for an unreplicated service).
        self.replicas = [[a] if isinstance(a, str) else list(a) for a in addresses]
        if not all(self.replicas):
            raise ValueError("EngramClient: a shard with no replica address")
        #: Per shard, the replica reads go to now (it moves on failover).
        self.addresses = [r[0] for r in self.replicas]
        self._read = [0] * len(self.replicas)
        self._primary = [0] * len(self.replicas)  # where pushes go: the replica that orders them
        self._client_id = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self.layout = layout
        self.plan = ShardPlan(layout.total_rows, len(self.addresses))
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._stats_lock = threading.Lock()
        self._counters: collections.Counter = collections.Counter()
        self._latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self._io = IoThread(name=f"engram-client-{id(self):x}")
        self._tasks: set[asyncio.Task] = set()  # lookups in flight (touched on the I/O thread only)
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        self._metadata = auth_metadata(token)
        self._resolver, self.recover_timeout = resolver, float(recover_timeout)
        self._opts = opts
        self._creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
        flat = self._io.run(self._open(opts, self._creds, [a for r in self.replicas for a in r]))
        self._channels = list(flat)  # every channel ever opened, closed at shutdown
        it = iter(flat)
        self._rstubs = [[pb_grpc.EngramMemoryStub(next(it)) for _ in r] for r in self.replicas]
        # A client dropped without close() still stops its thread when collected.
        self._finalizer = weakref.finalize(self, _shutdown, self._io, self._channels)
        self.shards = self._connect(connect_timeout)
        dtypes = {s.dtype for s in self.shards}
        if len(dtypes) != 1:
            self.close()
            raise EngramError(f"shards disagree on the storage dtype: {sorted(dtypes)}")
        self.dtype_name = dtypes.pop()
        self.dtype = codec.wire_dtype(self.dtype_name)
        limit = min([max_message_bytes, chunk_bytes + 4096] + [s.max_message_bytes for s in self.shards])
        self._message_limit = limit
        # ~1 MiB messages (chunk_bytes): several per shard are in flight at once, so a shard
        # gathers the next while the last is on the wire; ids (8 B) are smaller than rows.
        self.max_rows_per_message = max(1, min(min(s.max_ids_per_request for s in self.shards),
                                               (limit - 4096) // max(8, layout.row_dim * self.dtype.itemsize)))

    # Connection ----------------------------------------------------------------------------
    async def _open(self, opts, creds, addresses: Sequence[str] | None = None) -> list:
        addresses = self.addresses if addresses is None else addresses
        if creds is not None:
            return [grpc.aio.secure_channel(a, creds, options=opts) for a in addresses]
        return [grpc.aio.insecure_channel(a, options=opts) for a in addresses]

    async def _reresolve(self, shard: int) -> None:
        """Ask the resolver where ``shard`` serves now; move its channel if it moved."""
        loop = asyncio.get_running_loop()
        try:
            now = list(await loop.run_in_executor(None, self._resolver))
        except Exception as e:  # noqa: BLE001 - the directory may be briefly unreachable too
            log.warning("resolving shard addresses failed: %s", e)
            return
        want = [now[shard]] if isinstance(now[shard], str) else list(now[shard])
        for r, address in enumerate(want[:len(self.replicas[shard])]):
            if address != self.replicas[shard][r]:
                log.warning("shard %d replica %d moved: %s -> %s", shard, r, self.replicas[shard][r], address)
                self.replicas[shard][r] = address
                ch = (await self._open(self._opts, self._creds, [address]))[0]
                self._channels.append(ch)
                self._rstubs[shard][r] = pb_grpc.EngramMemoryStub(ch)
                self._count("re_resolved", 1)
        self.addresses[shard] = self.replicas[shard][self._read[shard]]

    async def _describe_all(self, timeout: float, wait_for_ready: bool = False,
                            every_replica: bool = False) -> list:
        """Per shard, the DescribeResponse of the replica reads go to (or of each replica),
        or the RpcError it failed with."""
        stubs = [stub for s, reps in enumerate(self._rstubs)
                 for r, stub in enumerate(reps) if every_replica or r == self._read[s]]
        return await asyncio.gather(
            *[stub.Describe(pb.DescribeRequest(), timeout=timeout, wait_for_ready=wait_for_ready,
                            metadata=self._metadata)
              for stub in stubs], return_exceptions=True)

    def _connect(self, timeout: float) -> list[ShardInfo]:
        flat = iter(self._io.run(self._describe_all(timeout, wait_for_ready=True, every_replica=True)))
        answers = []
        for s, reps in enumerate(self.replicas):
            got = [next(flat) for _ in reps]
            ok = [r for r, d in enumerate(got) if not isinstance(d, BaseException)]
            if ok and len(ok) < len(reps):
                log.warning("shard %d: replicas %s do not answer; using the others",
                            s, [r for r in range(len(reps)) if r not in ok])
            if ok:
                self._read[s] = ok[0]
                self.addresses[s] = reps[ok[0]]
            answers.append(got[ok[0]] if ok else got[0])
        infos = []
        for i, d in enumerate(answers):
            if isinstance(d, grpc.RpcError) and d.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.close()
                raise AuthError(f"shard {i} at {self.addresses[i]}: {d.details()}") from None
            if isinstance(d, grpc.RpcError):
                self.close()
                raise ShardUnavailable(i, self.addresses[i], f"{d.code().name}: {d.details()}") from None
            if isinstance(d, BaseException):
                self.close()
                raise d
            want = self.plan.shard_range(i)
            if d.fingerprint != self.layout.fingerprint:
                self.close()
                raise FingerprintMismatch(f"shard {i} at {self.addresses[i]} serves layout "
                                          f"{d.fingerprint!r}, this client hashes for {self.layout.fingerprint!r}")
            if (d.row_start, d.row_stop) != want or d.num_shards != len(self.addresses):
                self.close()
                raise EngramError(f"shard {i} at {self.addresses[i]} owns rows [{d.row_start}, {d.row_stop}) "
                                  f"of {d.num_shards} shards; expected {list(want)} of {len(self.addresses)}: "
                                  "addresses are out of order or from another deployment")
            # The rest of what a shard says about itself decides how the client reads its
            # answers: a value no real shard gives is refused, not acted on.
            bad = ([f"dtype {d.dtype!r} (expected one of {', '.join(STORE_DTYPES)})"]
                   * (d.dtype not in STORE_DTYPES)
                   + [f"dim {d.dim} (the layout's rows have {self.layout.row_dim})"] * (d.dim != self.layout.row_dim)
                   + [f"max_message_bytes {d.max_message_bytes} (expected at least 8192)"]
                   * (d.max_message_bytes < 8192)
                   + [f"max_ids_per_request {d.max_ids_per_request} (expected >= 0)"] * (d.max_ids_per_request < 0))
            if bad:
                self.close()
                raise EngramError(f"shard {i} at {self.addresses[i]} describes itself with {'; '.join(bad)}: "
                                  "not an engram_ray shard of this layout")
            infos.append(ShardInfo(i, self.addresses[i], d.row_start, d.row_stop, d.dtype, d.max_message_bytes,
                                   d.max_ids_per_request or (1 << 62)))
        return infos

    def close(self) -> None:
        """Close the channels and stop the I/O thread (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "EngramClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Calls ---------------------------------------------------------------------------------
    async def _call(self, shard: int, method: str, request, retry_codes) -> Any:
        """One RPC with failover, retries and backoff; failures become the project's
        exceptions. Reads go to any replica and move to the next one at once when theirs
        fails; pushes go to the primary (a backup names it). With a resolver, a shard that
        stays unavailable is looked up again and waited for (it may be restarting) for up to
        ``recover_timeout`` seconds."""
        push = method == "ApplyGradients"
        n_rep = len(self.replicas[shard])
        attempt, give_up, tried, hops = 0, None, 0, 0
        while True:
            r = self._primary[shard] if push else self._read[shard]
            try:
                stub_method = getattr(self._rstubs[shard][r], method)  # the stub may have moved
                return await stub_method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                if push and code == grpc.StatusCode.FAILED_PRECONDITION and PRIMARY_IS in details \
                        and hops < 4 * n_rep:
                    self._primary[shard] = self._primary_hint(shard, details)
                    hops += 1
                    self._count("redirects", 1)
                    continue
                busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY in details
                if not (code in retry_codes or busy):
                    raise self._error(shard, err) from None
                pending = push and NOT_REPLICATED in details  # the primary is fine: retry it
                if n_rep > 1 and not busy and not pending and tried < n_rep - 1:
                    nxt = (r + 1) % n_rep  # the next replica, at once
                    if push:
                        self._primary[shard] = nxt
                    else:
                        self._read[shard] = nxt
                        self.addresses[shard] = self.replicas[shard][nxt]
                    tried += 1
                    self._count("failovers", 1)
                    continue
                tried = 0
                if attempt < self.retries:
                    self._count("retries", 1)
                    await asyncio.sleep(self.backoff * (2 ** attempt))
                    attempt += 1
                    continue
                if self._resolver is None or busy:
                    raise self._error(shard, err) from None
                now = time.monotonic()
                give_up = give_up or now + self.recover_timeout
                if now > give_up:
                    raise self._error(shard, err) from None
                self._count("retries", 1)
                await self._reresolve(shard)
                await asyncio.sleep(min(1.0, self.backoff * (2 ** attempt)))

    async def _gather(self, calls) -> list:
        """Run ``_call``s at once; raise the first failure after all have ended."""
        out = await asyncio.gather(*calls, return_exceptions=True)
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out

    # Lookups -------------------------------------------------------------------------------
    def _flat_ids(self, row_ids: Any, copy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(ids as given, flat int64 ids)``, refused before any call if not table rows."""
        ids = np.asarray(row_ids)
        if ids.dtype.kind not in "iu":
            raise InvalidRequest(f"row ids must be integers, got dtype {ids.dtype}")
        flat = np.array(ids.reshape(-1), dtype=np.int64, copy=copy or None)
        if flat.size and (flat.min() < 0 or flat.max() >= self.layout.total_rows):
            bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
            raise InvalidRequest(f"row id {bad} is outside the table's {self.layout.total_rows} rows")
        return ids, flat

    def prefetch(self, row_ids: Any) -> Prefetch:
        """Start fetching the rows of ``row_ids`` (any shape); returns at once."""
        return self.prefetch_many([row_ids])[0]

    def prefetch_many(self, row_ids: Sequence[Any]) -> list[Prefetch]:
        """:meth:`prefetch` for several arrays (e.g. one per Engram layer) with one hand-over
        to the I/O thread: each wake-up of that thread costs the caller a syscall and a GIL
        round trip. Requests go out in the order given."""
        items = []
        for r in row_ids:
            ids, flat = self._flat_ids(r, copy=True)  # the I/O thread reads them later
            p = Prefetch(int(flat.size))
            p._future = concurrent.futures.Future()
            items.append((flat, ids.shape, p))
        self._count("lookups", len(items))
        self._count("ids", sum(int(f.size) for f, _, _ in items))
        self._io.submit(self._start(items))
        return [p for _, _, p in items]

    async def _start(self, items) -> None:
        for flat, shape, p in items:  # tasks start in this order, so their requests do too
            task = asyncio.get_running_loop().create_task(self._lookup_into(flat, shape, p))
            self._tasks.add(task)  # the loop holds tasks weakly: keep each until it ends
            task.add_done_callback(self._tasks.discard)

    async def _lookup_into(self, flat: np.ndarray, shape: tuple[int, ...], p: Prefetch) -> None:
        try:
            p._future.set_result(await self._lookup(flat, shape, p))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the Prefetch
            p._future.set_exception(e)

    async def _lookup(self, flat: np.ndarray, shape: tuple[int, ...], p: Prefetch) -> np.ndarray:
        t0 = time.perf_counter()
        if flat.size < 2 or (flat[1:] > flat[:-1]).all():
            uniq, inverse = flat, None  # already unique and sorted (deduplicated upstream)
        else:
            uniq, inverse = np.unique(flat, return_inverse=True)
        t1 = time.perf_counter()
        dim = self.layout.row_dim
        uniq_rows = np.empty((uniq.size, dim), dtype=self.dtype)
        decode_s = 0.0

        async def chunk(shard: int, a: int, b: int, request) -> None:
            # Each answer is copied into place as it lands, while the others are in flight.
            nonlocal decode_s
            resp = await self._call(shard, "Lookup", request, _LOOKUP_RETRY)
            t = time.perf_counter()
            try:
                rows = codec.decode(resp.rows, what="rows", dtypes=(self.dtype_name,), ndim=2)
            except ValueError as e:  # the shard's answer is bad, not the caller's ids
                raise EngramError(f"shard {shard} ({self.addresses[shard]}) answered a lookup with {e}") from None
            if rows.shape != (b - a, dim):
                raise EngramError(f"shard {shard} answered {rows.shape} rows for {b - a} ids")
            uniq_rows[a:b] = rows
            decode_s += time.perf_counter() - t

        calls = [chunk(s, a, b, pb.LookupRequest(fingerprint=self.layout.fingerprint,
                                                 row_ids=codec.encode(uniq[a:b])))
                 for s, a, b in self._chunks(uniq)]
        t2 = time.perf_counter()
        await self._gather(calls)
        t3 = time.perf_counter()
        p._seconds = t3 - t0
        out = uniq_rows.reshape(*shape, dim) if inverse is None else uniq_rows[inverse].reshape(*shape, dim)
        with self._stats_lock:
            c = self._counters
            c["unique_ids"] += int(uniq.size)
            c["bytes_received"] += uniq_rows.nbytes
            # Where a lookup's time goes on this client's I/O thread (see stats()).
            c["io_dedup_s"] += t1 - t0
            c["io_encode_s"] += t2 - t1
            c["io_in_flight_s"] += t3 - t2 - decode_s
            c["io_decode_s"] += decode_s + time.perf_counter() - t3
            self._latencies.append(p._seconds)
        return out

    def lookup(self, row_ids: Any, timeout: float | None = None) -> np.ndarray:
        """Rows ``[*row_ids.shape, dim]`` in the shards' storage dtype."""
        return self.prefetch(row_ids).result(timeout)

    async def alookup(self, row_ids: Any) -> np.ndarray:
        """:meth:`lookup` for callers in an event loop."""
        return await self.prefetch(row_ids)

    def _chunks(self, uniq_sorted: np.ndarray, step: int | None = None):
        """(shard, a, b): slices of the sorted unique ids, one shard each, under the limit."""
        cuts = np.searchsorted(uniq_sorted, self.plan.bounds)
        step = step or self.max_rows_per_message
        for s in range(self.plan.num_shards):
            for a in range(int(cuts[s]), int(cuts[s + 1]), step):
                yield s, a, min(a + step, int(cuts[s + 1]))

    # Training ------------------------------------------------------------------------------
    def push_gradients(self, row_ids: Any, grads: Any, timeout: float | None = None) -> int:
        """Send row gradients ``[*ids.shape, dim]`` to their shards (duplicates summed here);
        returns the number of distinct rows updated."""
        return self._io.submit(self._push(*self._check_push(row_ids, grads))).result(timeout)

    async def apush_gradients(self, row_ids: Any, grads: Any) -> int:
        """:meth:`push_gradients` for callers in an event loop."""
        return await asyncio.wrap_future(self._io.submit(self._push(*self._check_push(row_ids, grads))))

    def _check_push(self, row_ids: Any, grads: Any) -> tuple[np.ndarray, np.ndarray]:
        ids, flat = self._flat_ids(row_ids)
        g = np.asarray(grads, dtype=np.float32)
        if g.shape != ids.shape + (self.layout.row_dim,):
            raise InvalidRequest(f"gradients have shape {g.shape}; expected "
                                 f"{ids.shape + (self.layout.row_dim,)} (ids shape + row dim)")
        g = g.reshape(flat.size, -1)
        if not np.isfinite(g).all():
            raise InvalidRequest("gradients hold NaN or Inf; nothing was sent")
        return flat, g

    async def _push(self, flat: np.ndarray, g: np.ndarray) -> int:
        uniq, summed = sum_duplicates(flat, g)
        # an id (8 B) and a float32 gradient row per unique row, under the message limit with
        # room for a primary to wrap the push for its backups
        step = max(1, min(self.max_rows_per_message, (self._message_limit - 4096) // (8 + 4 * self.layout.row_dim)))
        chunks = list(self._chunks(uniq, step))
        resps = await self._gather(
            self._call(s, "ApplyGradients",
                       pb.ApplyGradientsRequest(fingerprint=self.layout.fingerprint,
                                                row_ids=codec.encode(uniq[a:b]),
                                                grads=codec.encode(summed[a:b], "float32"),
                                                request_id=f"{self._client_id}-{next(self._seq)}"),
                _PUSH_RETRY)
            for s, a, b in chunks)
        for (s, a, b), r in zip(chunks, resps):
            if not 0 <= r.rows_updated <= b - a or r.update_count < 0:
                raise EngramError(f"shard {s} ({self.addresses[s]}) answered a push of {b - a} distinct rows "
                                  f"with rows_updated={r.rows_updated}, update_count={r.update_count}")
        self._count("pushes", 1)
        self._count("rows_pushed", int(uniq.size))
        return sum(r.rows_updated for r in resps)

    # Service calls --------------------------------------------------------------------------
    def describe(self, tolerate: bool = False, every_replica: bool = False) -> list[dict[str, Any]]:
        """Every shard's Describe (of the copy reads go to, or of every copy), as dicts with
        counters. ``tolerate``: a copy that does not answer gives ``{"shard_index",
        "replica", "address", "error"}`` instead of raising."""
        where = [(i, r) for i, reps in enumerate(self.replicas) for r in range(len(reps))
                 if every_replica or r == self._read[i]]
        out = []
        for (i, r), d in zip(where, self._io.run(self._describe_all(self.timeout, every_replica=every_replica))):
            address = self.replicas[i][r]
            if isinstance(d, BaseException):
                if tolerate:
                    out.append({"shard_index": i, "replica": r, "address": address,
                                "error": str(self._error(i, d))})
                    continue
                raise self._error(i, d) from None
            info = {fd.name: getattr(d, fd.name) for fd in d.DESCRIPTOR.fields if fd.name not in ("counters", "backups")}
            info["backups"] = list(d.backups)
            info["counters"] = {fd.name: getattr(d.counters, fd.name) for fd in d.counters.DESCRIPTOR.fields}
            info["address"] = address
            info["replicas"] = list(self.replicas[i])
            out.append(info)
        return out

    def save(self, directory: str) -> list[str]:
        """Ask every shard to write its part of a checkpoint into ``directory`` (one replica
        each); with ``directory=""`` every replica writes a recovery checkpoint."""
        every = not directory
        targets = [(s, stub) for s, reps in enumerate(self._rstubs) for r, stub in enumerate(reps)
                   if every or r == self._read[s]]

        async def save_all():
            return await asyncio.gather(
                *[stub.Save(pb.SaveRequest(directory=str(directory)), timeout=max(self.timeout, 600),
                            metadata=self._metadata)
                  for _, stub in targets], return_exceptions=True)
        paths = []
        for (i, _), r in zip(targets, self._io.run(save_all())):
            if isinstance(r, BaseException):
                raise self._error(i, r) from None
            paths.append(r.header_path)
        return paths

    # Errors and counters ---------------------------------------------------------------------
    def _primary_hint(self, shard: int, details: str) -> int:
        """The replica a backup named as the primary (``primary=<r>``), checked."""
        rest = details.split(PRIMARY_IS, 1)[1].split()
        word = rest[0] if rest else ""
        n_rep = len(self.replicas[shard])
        if not (word.isascii() and word.isdigit()) or not int(word) < n_rep:
            raise EngramError(f"shard {shard} ({self.addresses[shard]}) named primary {word!r}; expected a "
                              f"replica index below {n_rep} (details: {details[:200]!r})")
        return int(word)

    def _error(self, shard: int, err: BaseException) -> BaseException:
        if not isinstance(err, grpc.RpcError):
            return err
        code, details = err.code(), err.details()
        self._count("errors", 1)
        if code in _ERRORS:
            return _ERRORS[code](f"shard {shard} ({self.addresses[shard]}): {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ShardUnavailable(shard, self.addresses[shard], f"{code.name} after "
                                    f"{self.retries} retries: {details}")
        return EngramError(f"shard {shard} ({self.addresses[shard]}): {code.name}: {details}")

    def _count(self, key: str, n: int) -> None:
        with self._stats_lock:
            self._counters[key] += n

    def stats(self) -> dict[str, Any]:
        """Requests, ids, unique ids, dedup ratio, bytes, retries, errors, latency percentiles."""
        with self._stats_lock:
            c = dict(self._counters)
            lat = np.array(self._latencies)
        ids, uniq = c.get("ids", 0), c.get("unique_ids", 0)
        out = {k: c.get(k, 0) for k in ("lookups", "ids", "unique_ids", "bytes_received", "pushes",
                                        "rows_pushed", "retries", "failovers", "redirects", "re_resolved",
                                        "errors")}
        out["dedup_ratio"] = (uniq / ids) if ids else None  # unique ids fetched per id asked
        # Seconds of lookup work on the I/O thread, by stage: dedup (np.unique), encode (build
        # requests), in_flight (calls issued to last answer: transport + shard), decode
        # (bytes -> rows, scatter to the caller's order). None of it blocks the caller.
        out["io_seconds"] = {k: float(c.get(f"io_{k}_s", 0.0)) for k in ("dedup", "encode", "in_flight", "decode")}
        for q in (50, 90, 99):
            out[f"latency_p{q}_ms"] = float(np.percentile(lat, q) * 1e3) if lat.size else None
        return out


def _shutdown(io: IoThread, channels: list) -> None:
    """Close ``channels`` on their loop, then stop it (runs once, from close() or GC)."""
    async def close_all():
        await asyncio.gather(*[ch.close() for ch in channels], return_exceptions=True)
    try:
        io.close(close_all())
    except Exception:  # noqa: BLE001 - closing must not raise over the caller's own error
        log.debug("closing client channels failed", exc_info=True)
