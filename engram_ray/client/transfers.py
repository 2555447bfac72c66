"""Lookups and pushes on the client's I/O thread: plan (:mod:`.plan`), call every message at
once (:mod:`.calls`), check and place each answer as it lands; and ``Prefetch``, the caller's
handle on rows on their way. A lookup agent's one-message lookups may instead run on its own
thread, as a message on the shard's LookupStream or one blocking call
(:meth:`Transfers.unique_now`)."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ..core.dtypes import row_width
from ..core.layout import ShardPlan, TableLayout
from ..core.optim import sum_duplicates
from ..errors import EngramError
from ..rpc import codec, wire
from ..rpc.generated import engram_pb2 as pb
from . import plan
from .cache import RowCache
from .calls import ShardCalls
from .stats import ClientStats

if TYPE_CHECKING:
    from .streams import LookupStreams

__all__ = ["Prefetch", "Transfers", "UniqueRows"]

#: The longest a direct lookup (:meth:`Transfers.unique_now`) waits for its shard before the
#: full path takes over: ~100x a healthy lookup here, far below the client's timeout.
DIRECT_TIMEOUT_S = 0.5
#: After a direct try of a shard failed, its lookups go the full path for this long.
DIRECT_COOL_DOWN_S = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class UniqueRows:
    """A lookup's rows once per distinct id: ``rows[inverse]`` is the lookup in the caller's
    order, ``[*shape, dim]`` once reshaped. Moving ``rows`` and ``inverse`` (and expanding
    them where the rows are used, e.g. on the device) moves each row once."""

    ids: np.ndarray       #: [U] int64, sorted unique ids
    rows: np.ndarray      #: [U, dim] in the storage dtype
    inverse: np.ndarray   #: [N] int64 positions in ``ids``; N = prod(shape)
    shape: tuple[int, ...]  #: the shape of the ids asked for

    def expand(self) -> np.ndarray:
        """Rows ``[*shape, dim]`` in the caller's order (a gather: a new array)."""
        return plan.scatter(self.rows, self.inverse, self.shape)


class Prefetch(Generic[T]):
    """Rows on their way. ``result()`` (or ``await``) gives ``[*ids.shape, dim]`` (or, for
    :meth:`EngramClient.prefetch_unique`, :class:`UniqueRows`)."""

    def __init__(self, num_ids: int):
        self._num_ids = num_ids
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()
        #: Issue-to-arrival seconds, set on the I/O thread when the last response is in.
        self._seconds: float | None = None

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Any) -> None:
        """Call ``fn(future)`` once the lookup ended (at once if it has), with the finished
        ``concurrent.futures.Future`` (``future.result(0)`` is the rows): on the client's I/O
        thread, so ``fn`` must be quick and must not block. (Not ``fn(self)``: the future
        keeps its callbacks, and a callback holding this Prefetch would make a cycle that
        keeps the rows' buffer alive until a garbage collection.)"""
        self._future.add_done_callback(fn)

    @property
    def fetch_seconds(self) -> float | None:
        """Time from issue to the last response (None while in flight)."""
        return self._seconds

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"lookup of {self._num_ids} ids: not complete after {timeout} s") from None

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._future).__await__()


async def _gather(calls: list[Any]) -> list[Any]:
    """Run calls at once; raise the first failure after all have ended."""
    out = await asyncio.gather(*calls, return_exceptions=True)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


@dataclass
class _Lookup:
    """One lookup between its plan and its answers: the unique ids and where their rows go,
    the ids asked of the shards (the cache's misses, at ``miss``), the messages, timings."""

    uniq: np.ndarray                    #: [U] sorted unique ids
    inverse: np.ndarray | None          #: [N] or None (the ids were sorted and unique)
    uniq_rows: np.ndarray               #: [U, width] where the rows land
    want: np.ndarray                    #: the ids asked of the shards
    miss: np.ndarray | None             #: positions of ``want`` in ``uniq`` (None: all of them)
    tags: dict[int, int | None] | None  #: per shard, the rows version its answers carried
    epoch: int                          #: the cache's epoch when planned
    requests: list[tuple[int, int, int, pb.LookupRequest]]  #: (shard, a, b, message)
    t0: float
    t1: float
    decode_s: list[float] = field(default_factory=lambda: [0.0])


class Transfers:
    """Lookups and pushes of ``layout``'s rows, stored as ``dtype_name``, over ``calls``."""

    def __init__(self, calls: ShardCalls, layout: TableLayout, shard_plan: ShardPlan, sizes: plan.MessageSizes,
                 dtype_name: str, stats: ClientStats, cache: RowCache | None = None,
                 cache_max_age_s: float = 1.0):
        self.calls, self.layout, self.bounds, self.sizes = calls, layout, shard_plan.bounds, sizes
        self.dtype_name, self.dtype = dtype_name, codec.wire_dtype(dtype_name)
        self.width = row_width(dtype_name, layout.row_dim)  # packed bytes for FP8 rows
        self._row_nbytes = self.width * np.dtype(self.dtype).itemsize
        self.stats = stats
        #: Hot rows (None: every row from the shards). Touched on the I/O thread only.
        self.cache = cache
        #: Per shard, the version of its rows (LookupResponse.update_count) the cached rows of it
        #: have (None: none seen yet), and when it last answered (time.monotonic()).
        self._versions: list[int | None] = [None] * (len(self.bounds) - 1)
        self._answered = [0.0] * (len(self.bounds) - 1)
        self._bounds = [int(b) for b in self.bounds]  # the shards' first ids, for bisect
        #: A cached row is served only if its shard answered this client within this many
        #: seconds (with the version the row was cached at); else it is fetched again.
        self.cache_max_age_s = cache_max_age_s
        self._client_id = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()  # lookups in flight (touched on the I/O thread only)
        #: Per shard, until when (time.monotonic()) lookups of it are not tried directly.
        self._direct_off = [0.0] * (len(self.bounds) - 1)

    # Lookups -------------------------------------------------------------------------------
    async def start(self, items: list[tuple[np.ndarray, tuple[int, ...], Prefetch]], kind: str = "rows",
                    outs: list[np.ndarray | None] | None = None, ordered: bool = False) -> None:
        """Start a lookup task per item; tasks start in this order, so their requests do too.
        ``kind``: what each Prefetch gets -- ``"rows"`` (``[*shape, dim]``, or ``outs[i]``
        filled in the caller's order) or ``"unique"`` (:class:`UniqueRows`, its rows written
        into ``outs[i][:U]`` when given). ``ordered``: one after the other, each once the one
        before has its rows (for Engram layers, earliest first: see ``RemoteMemory``)."""
        works = []
        for i, (flat, shape, p) in enumerate(items):
            out = outs[i] if outs is not None else None
            work = self.unique(flat, shape, p, out) if kind == "unique" else self.lookup(flat, shape, p, out)
            works.append(self._into(work, p))
        for coro in ([self._in_order(works)] if ordered else works):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)  # the loop holds tasks weakly: keep each until it ends
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _in_order(works: list[Any]) -> None:
        for work in works:  # each sets its own Prefetch, failed or not: the next one still runs
            await work

    @staticmethod
    async def _into(work: Any, p: Prefetch) -> None:
        try:
            p._future.set_result(await work)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the Prefetch
            p._future.set_exception(e)

    async def lookup(self, flat: np.ndarray, shape: tuple[int, ...], p: Prefetch,
                     out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[*shape, dim]`` in the caller's order; into ``out`` (``[N, dim]``, C-contiguous,
        the storage dtype) when given, else a new array."""
        uniq, inverse, uniq_rows, stages, t3, fetched = await self._fetch(flat, p, None)
        if out is None:
            rows = plan.scatter(uniq_rows, inverse, shape)
        else:
            rows = out
            np.take(uniq_rows, np.arange(uniq.size) if inverse is None else inverse, axis=0, out=out)
        stages["decode"] += time.perf_counter() - t3
        self._done(uniq, fetched, stages, p._seconds or 0.0)
        return rows

    async def unique(self, flat: np.ndarray, shape: tuple[int, ...], p: Prefetch,
                     rows_out: np.ndarray | None = None) -> UniqueRows:
        """:class:`UniqueRows` of ``flat``; rows written into ``rows_out[:U]`` when given
        (caller-owned, ``[>= N, dim]`` in the storage dtype: no copy after the wire's)."""
        return self._unique_rows(await self._fetch(flat, p, rows_out), shape, p._seconds or 0.0)

    def _unique_rows(self, landed: tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, float], float, int],
                     shape: tuple[int, ...], latency: float) -> UniqueRows:
        """A landed lookup (:meth:`_landed`) as :class:`UniqueRows`, counted in the stats."""
        uniq, inverse, uniq_rows, stages, t3, fetched = landed
        inv = np.arange(uniq.size, dtype=np.int64) if inverse is None else inverse.astype(np.int64, copy=False)
        stages["decode"] += time.perf_counter() - t3
        self._done(uniq, fetched, stages, latency)
        return UniqueRows(uniq, uniq_rows, inv, shape)

    def _done(self, uniq: np.ndarray, fetched: int, stages: dict[str, float], latency: float) -> None:
        self.stats.lookup_done(unique_ids=int(uniq.size), nbytes=fetched * self._row_nbytes,
                               stages=stages, latency=latency)

    async def _fetch(self, flat: np.ndarray, p: Prefetch, rows_out: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, float], float, int]:
        """Dedup, take the cached rows, call every message for the rest at once, place the rows
        of the unique ids as they land (into ``rows_out[:U]`` when given). Returns ``(uniq,
        inverse, uniq_rows, stages, t, rows fetched from the shards)``."""
        f = self._plan(flat, rows_out)
        calls = [self._chunk(sh, a, b, req, f) for sh, a, b, req in f.requests]
        t2 = time.perf_counter()
        await _gather(calls)
        landed = self._landed(f, t2)
        p._seconds = landed[4] - f.t0
        return landed

    def unique_now(self, flat: np.ndarray, shape: tuple[int, ...], rows_out: np.ndarray | None,
                   stub_of: Any, streams: LookupStreams | None = None) -> UniqueRows | None:
        """:meth:`unique` on the calling thread with one blocking call (``stub_of(address)``: a
        synchronous stub; ``streams``: a :class:`~.streams.LookupStreams` whose stream to the
        shard carries the request where one serves it, a message instead of a call's set-up),
        where the lookup is one message to one shard and there is no cache
        (the cache is the I/O thread's alone); None where it is not, or where the try failed
        in any way (the caller then asks :meth:`unique`, which retries, fails over and raises
        what went wrong, with its statistics). Why: a node's lookup agent answering the first
        Engram layer, where an asyncio hand-off and ``grpc.aio`` cost 0.2-0.5 ms of a ~1.3 ms
        lookup on a shared core (measured with a timeline of each hop).

        A try waits at most :data:`DIRECT_TIMEOUT_S` (not the client's timeout), and a shard
        whose try failed is not tried directly for :data:`DIRECT_COOL_DOWN_S`: a hung or lost
        shard costs the caller one short wait, not a full timeout before every fallback."""
        if self.cache is not None or flat.size == 0 or flat.size > self.sizes.lookup_rows:
            return None
        # on a list: no arrays to build
        lo = bisect.bisect_right(self._bounds, int(np.minimum.reduce(flat))) - 1
        if lo != bisect.bisect_right(self._bounds, int(np.maximum.reduce(flat))) - 1 \
                or time.monotonic() < self._direct_off[lo]:
            return None
        f = self._plan(flat, rows_out, shard=lo)
        [(sh, a, b, req)] = f.requests
        t2 = time.perf_counter()
        address, streamed = self.calls.replicas.addresses[sh], False
        try:
            timeout = min(self.calls.timeout, DIRECT_TIMEOUT_S)
            until = time.monotonic() + timeout  # the stream's try and a call's together
            # a stream's answers are small (wire.MAX_STREAM_ANSWER_BYTES): larger ones by a call
            fits = (b - a) * self._row_nbytes <= wire.MAX_STREAM_ANSWER_BYTES
            resp = streams.ask(address, req, timeout) if streams is not None and fits else None
            streamed = resp is not None
            if resp is None:  # no stream serves it now: a call, in what is left of the time
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"direct lookup: no answer within {timeout} s")
                resp = stub_of(address).Lookup(req, timeout=left, metadata=self.calls.metadata)
            self._land(sh, a, b, resp, f)
            if streamed:
                self.stats.count("lookups_streamed", 1)
        except Exception:  # noqa: BLE001 - an RpcError, a bad answer, a closed client: the full path says
            if streamed and streams is not None:  # an answer refused: that stream is not trusted again
                streams.drop(address)
            self._direct_off[sh] = time.monotonic() + DIRECT_COOL_DOWN_S
            self.stats.count("lookups_direct_failed", 1)
            return None
        landed = self._landed(f, t2)
        return self._unique_rows(landed, shape, landed[4] - f.t0)

    def _plan(self, flat: np.ndarray, rows_out: np.ndarray | None, shard: int | None = None) -> _Lookup:
        """Dedup, take the cached rows, and the messages for the rest (``shard``: every id is
        that shard's and fits one message, and there is no cache: one message, unsplit)."""
        t0 = time.perf_counter()
        uniq, inverse = plan.dedup(flat)
        t1 = time.perf_counter()
        if rows_out is None:
            uniq_rows = np.empty((uniq.size, self.width), dtype=self.dtype)
        else:
            uniq_rows = plan.check_out(rows_out, uniq.size, self.width, self.dtype)
        cache = self.cache
        want, miss, epoch = uniq, None, 0
        tags: dict[int, int | None] | None = None
        if cache is not None:  # hits land in place now; only the misses go out, and land at `miss`
            epoch = cache.epoch
            miss = np.flatnonzero(~self._hits(uniq, uniq_rows))
            want = uniq[miss]
            tags = {}  # per shard: the version its answers here carried (None: they differed)
        parts = [(shard, 0, want.size)] if shard is not None else plan.split(want, self.bounds, self.sizes.lookup_rows)
        requests = [(sh, a, b, pb.LookupRequest(fingerprint=self.layout.fingerprint, row_ids=codec.encode(want[a:b])))
                    for sh, a, b in parts]
        return _Lookup(uniq, inverse, uniq_rows, want, miss, tags, epoch, requests, t0, t1)

    def _landed(self, f: _Lookup, t2: float
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, float], float, int]:
        """Every answer is in: cache what may be cached; ``(uniq, inverse, uniq_rows, stages'
        seconds, t (now), rows fetched from the shards)``."""
        t3 = time.perf_counter()
        cache, miss, tags, want, uniq = self.cache, f.miss, f.tags, f.want, f.uniq
        if cache is not None and miss is not None and tags is not None:
            if cache.epoch == f.epoch:  # no push through this client ran meanwhile
                # only rows whose shard's version has not moved since they were read
                fresh = [sh for sh, v in tags.items() if v is not None and v == self._versions[sh]]
                keep = np.isin(self._shard_of(want), fresh)
                cache.put(want[keep], f.uniq_rows[miss[keep]])
            self.stats.count("bytes_saved", (uniq.size - want.size) * self._row_nbytes)
        decode = f.decode_s[0]
        stages = {"dedup": f.t1 - f.t0, "encode": t2 - f.t1, "in_flight": t3 - t2 - decode, "decode": decode}
        return uniq, f.inverse, f.uniq_rows, stages, t3, int(want.size)

    def _hits(self, uniq: np.ndarray, uniq_rows: np.ndarray) -> np.ndarray:
        """The cached rows of ``uniq`` written into ``uniq_rows``; the hit mask. Rows of a shard
        that has not answered for ``cache_max_age_s`` count as misses: fetched again, their
        answer says whether the shard's rows changed (another writer's push)."""
        assert self.cache is not None
        hit = self.cache.get(uniq, uniq_rows)
        now = time.monotonic()
        quiet = [sh for sh, t in enumerate(self._answered) if now - t > self.cache_max_age_s]
        if quiet and hit.any():
            again = hit & np.isin(self._shard_of(uniq), quiet)
            if again.any():
                self.cache.unhit(int(again.sum()))
                hit &= ~again
        return hit

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard that owns each of ``ids``."""
        return np.searchsorted(self.bounds, ids, side="right") - 1

    async def _chunk(self, shard: int, a: int, b: int, request: pb.LookupRequest, f: _Lookup) -> None:
        """Rows ``a:b`` of the ids asked from ``shard``, placed as they land (:meth:`_land`)
        while the other messages are in flight."""
        self._land(shard, a, b, await self.calls.call(shard, "Lookup", request), f)

    def _land(self, shard: int, a: int, b: int, resp: pb.LookupResponse, f: _Lookup) -> None:
        """Check ``shard``'s answer for ids ``a:b`` and copy its rows into place (into
        ``uniq_rows[a:b]``, or ``uniq_rows[miss[a:b]]`` when the ids asked are the cache's
        misses); an answer of another dtype or shape is the shard's error."""
        t = time.perf_counter()
        try:
            rows = codec.decode(resp.rows, what="rows", dtypes=(self.dtype_name,), ndim=2)
        except ValueError as e:  # the shard's answer is bad, not the caller's ids
            raise EngramError(f"{self._where(shard)} answered a lookup with {e}") from None
        if rows.shape != (b - a, self.width):
            raise EngramError(f"{self._where(shard)} answered {rows.shape} rows for {b - a} ids")
        if f.tags is not None:
            version = int(resp.update_count)
            self._seen(shard, version)
            f.tags[shard] = version if f.tags.get(shard, version) == version else None
        if f.miss is None:
            f.uniq_rows[a:b] = rows
        else:
            f.uniq_rows[f.miss[a:b]] = rows
        f.decode_s[0] += time.perf_counter() - t

    def _where(self, shard: int) -> str:
        return f"shard {shard} ({self.calls.replicas.addresses[shard]})"

    def _seen(self, shard: int, version: int) -> None:
        """A shard's rows version, as an answer carries it: if it moved (either way: a restart
        starts again from 0) since the rows cached from it were read, someone changed rows
        there -- drop them all."""
        assert self.cache is not None
        self._answered[shard] = time.monotonic()
        if self._versions[shard] is not None and self._versions[shard] != version:
            self.cache.drop_range(int(self.bounds[shard]), int(self.bounds[shard + 1]))
        self._versions[shard] = version

    # Pushes --------------------------------------------------------------------------------
    async def push(self, flat: np.ndarray, g: np.ndarray, lr: float | None = None) -> int:
        """Gradients ``g [n, dim]`` of ids ``flat [n]``, duplicates summed, to their shards;
        returns the number of distinct rows updated. Cached copies of the rows are forgotten
        when the push starts and again when it ends, and lookups in flight meanwhile do not
        fill the cache: this client never serves a row older than its own acknowledged push."""
        uniq, summed = sum_duplicates(flat, g)
        cache = self.cache
        if cache is not None:
            cache.epoch += 1
            cache.invalidate(uniq)
        chunks = plan.split(uniq, self.bounds, self.sizes.push_rows)
        try:
            resps = await _gather([self.calls.call(s, "ApplyGradients",
                                                   self._push_request(uniq[a:b], summed[a:b], lr))
                                   for s, a, b in chunks])
        finally:
            if cache is not None:  # landed or not (a retry may land later): nothing stale stays
                cache.epoch += 1
                cache.invalidate(uniq)
        if cache is not None:
            for (s, _, _), r in zip(chunks, resps):
                seen = self._versions[s]
                if seen is not None and r.update_count == seen + 1:
                    # our push alone moved the version: its rows were forgotten above, the
                    # rest of the shard's cached rows are still what the shard holds
                    self._versions[s] = int(r.update_count)
                    self._answered[s] = time.monotonic()
                else:  # another writer too (or a retry counted twice): drop the shard's rows
                    self._seen(s, int(r.update_count))
        for (s, a, b), r in zip(chunks, resps):
            if not 0 <= r.rows_updated <= b - a or r.update_count < 0:
                raise EngramError(f"shard {s} ({self.calls.replicas.addresses[s]}) answered a push of {b - a} "
                                  f"distinct rows with rows_updated={r.rows_updated}, "
                                  f"update_count={r.update_count}")
        self.stats.count("pushes", 1)
        self.stats.count("rows_pushed", int(uniq.size))
        return sum(r.rows_updated for r in resps)

    def _push_request(self, ids: np.ndarray, grads: np.ndarray, lr: float | None = None
                      ) -> pb.ApplyGradientsRequest:
        """A push, named (client id, sequence number) so a retry of it is applied once."""
        return pb.ApplyGradientsRequest(fingerprint=self.layout.fingerprint, row_ids=codec.encode(ids),
                                        grads=codec.encode(grads, "float32"),
                                        request_id=f"{self._client_id}-{next(self._seq)}", lr=lr or 0.0)
