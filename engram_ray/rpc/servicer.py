"""``ShardServicer``: decode -> :class:`TableShard` -> encode, and errors as status codes.

Thin on purpose: validation of ids and values lives in the shard, wire validation in the
codec; this class maps their exceptions onto gRPC status codes and counts rejections.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

from ..errors import CheckpointError, FingerprintMismatch, InvalidRequest, RequestTooLarge
from ..store import TableShard
from . import codec
from .metrics import LatencyHistogram, rss_bytes
from .replication import NOT_REPLICATED, PRIMARY_IS, SYNCING, Replication
from .generated import engram_pb2 as pb
from .generated import engram_pb2_grpc as pb_grpc

__all__ = ["ShardServicer"]

log = logging.getLogger(__name__)

class NotPrimary(Exception):
    """A push reached a backup while the primary is alive (FAILED_PRECONDITION)."""


class Unreplicated(Exception):
    """A push could not reach every replica yet, or this replica is still syncing (UNAVAILABLE)."""


_STATUS = ((NotPrimary, grpc.StatusCode.FAILED_PRECONDITION),
           (Unreplicated, grpc.StatusCode.UNAVAILABLE),
           (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
           (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
           (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
           (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
           (ValueError, grpc.StatusCode.INVALID_ARGUMENT))


class ShardServicer(pb_grpc.EngramMemoryServicer):
    """Serves one :class:`TableShard` as ``engram.v1.EngramMemory``."""

    def __init__(self, shard: TableShard, max_message_bytes: int, *, max_ids_per_request: int = 1 << 20,
                 recovery_save: Callable[[], str] | None = None,
                 observer: Callable[[str, float, int, bool], None] | None = None):
        self.shard = shard
        #: Called after each Lookup / ApplyGradients as (method, seconds, rows, ok), e.g. to
        #: export metrics; must be cheap and must not raise.
        self.observer = observer
        self.latency = LatencyHistogram()
        self.started = time.monotonic()
        #: Replication of this shard's pushes (None: the only copy).
        self.replication: Replication | None = None
        #: False while a (re)joining replica copies the primary: data calls get UNAVAILABLE.
        self.ready = True
        #: Save with no directory: write a recovery checkpoint (None: the shard has no
        #: checkpoint_dir, and such a request is refused).
        self.recovery_save = recovery_save
        self.max_message_bytes = int(max_message_bytes)
        self.max_ids_per_request = int(max_ids_per_request)
        self.bytes_served = 0
        self.lookup_seconds = 0.0
        self._lock = threading.Lock()

    # Helpers -----------------------------------------------------------------------------
    def _check_fingerprint(self, fp: str) -> None:
        if fp != self.shard.fingerprint:
            raise FingerprintMismatch(
                f"request is for table layout {fp!r} but shard {self.shard.shard_index} serves "
                f"{self.shard.fingerprint!r}; the client's config, tokenizer or seed differ")

    def count_rejected(self) -> None:
        with self._lock:
            self.shard.counters["rejected"] += 1

    def _check_count(self, n: int, what: str) -> None:
        if n > self.max_ids_per_request:
            raise RequestTooLarge(f"{what} of {n} ids exceeds the shard's limit of {self.max_ids_per_request} "
                                  "ids per request; split it")

    def _observe(self, method: str, t0: float, rows: int, ok: bool) -> None:
        if self.observer is not None:
            try:
                self.observer(method, time.perf_counter() - t0, rows, ok)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.debug("observer failed", exc_info=True)

    def _abort(self, context: grpc.ServicerContext, exc: Exception) -> None:
        self.count_rejected()
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                context.abort(code, str(exc))
        log.exception("shard %d: unexpected error", self.shard.shard_index)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # RPCs ---------------------------------------------------------------------------------
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        t0 = time.perf_counter()
        try:
            self._check_fingerprint(request.fingerprint)
            ids = codec.decode(request.row_ids, what="row_ids", dtypes=("int64",), ndim=1)
            self._check_count(ids.size, "lookup")
            self._check_ready()
            size = ids.size * self.shard.row_bytes
            if size + 1024 > self.max_message_bytes:
                raise RequestTooLarge(
                    f"lookup of {ids.size} rows x {self.shard.row_bytes} B = {size} B exceeds the "
                    f"shard's {self.max_message_bytes} B message limit; split the request")
            rows = self.shard.gather(ids)
        except Exception as e:  # noqa: BLE001 - every error becomes a status code
            self._observe("Lookup", t0, 0, False)
            self._abort(context, e)
        resp = pb.LookupResponse(rows=codec.encode(rows, self.shard.store.dtype))
        took = time.perf_counter() - t0
        with self._lock:  # handlers run on a thread pool
            self.bytes_served += rows.nbytes
            self.lookup_seconds += took
        self.latency.record(took)
        self._observe("Lookup", t0, ids.size, True)
        return resp

    def ApplyGradients(self, request: pb.ApplyGradientsRequest,
                       context: grpc.ServicerContext) -> pb.ApplyGradientsResponse:
        t0 = time.perf_counter()
        try:
            self._check_fingerprint(request.fingerprint)
            ids = codec.decode(request.row_ids, what="row_ids", dtypes=("int64",), ndim=1)
            self._check_count(ids.size, "gradient push")
            grads = codec.decode(request.grads, what="grads", ndim=2,
                                 dtypes=("float32", "bfloat16", "float16"))
            self._check_ready()
            n = self._apply(request, ids, grads)
        except Exception as e:  # noqa: BLE001
            self._observe("ApplyGradients", t0, 0, False)
            self._abort(context, e)
        self._observe("ApplyGradients", t0, n, True)
        return pb.ApplyGradientsResponse(rows_updated=n, update_count=self.shard.counters["updates"])

    def _apply(self, request: pb.ApplyGradientsRequest, ids, grads) -> int:
        """One push: alone, as a backup (forwarded), or as the primary (apply, then forward)."""
        repl = self.replication
        if repl is None:
            return self.shard.apply_gradients(ids, grads)
        rid = request.request_id
        if request.forwarded:
            with repl.order:
                repl.primary = request.primary  # follow whoever orders the pushes now
                done = repl.applied(rid)
                n = done[0] if done else self.shard.apply_gradients(ids, grads)
                repl.record(rid, n, True)
                return n
        if repl.primary != repl.index:
            if repl.primary_alive():
                raise NotPrimary(f"replica {repl.index} is a backup; send pushes to the primary, "
                                 f"{PRIMARY_IS}{repl.primary} at {repl.peers[repl.primary]}")
            repl.promote()
        with repl.order:
            done = repl.applied(rid)
            if done and done[1]:
                return done[0]  # a retry of a push every replica already has
            n = done[0] if done else self.shard.apply_gradients(ids, grads)
            repl.record(rid, n, False)
            failed = repl.forward(request)
            if failed:  # not acknowledged: the client retries the same id, which re-forwards
                raise Unreplicated(f"push applied on the primary but {NOT_REPLICATED} ({failed}); "
                                   "retry: it is applied once everywhere")
            repl.record(rid, n, True)
            return n

    def _check_ready(self) -> None:
        if not self.ready:
            raise Unreplicated(f"replica of shard {self.shard.shard_index} is {SYNCING} from the "
                               "primary; use another replica")

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext):
        """Stream rows and optimiser state to a joining replica, holding pushes meanwhile."""
        repl = self.replication
        try:
            self._check_fingerprint(request.fingerprint)
            if repl is not None and repl.role != "primary" and request.join_index == repl.primary and self.ready:
                repl.promote()  # the primary itself died and rejoins: this copy takes over
            if repl is None or repl.role != "primary" or not self.ready:
                raise NotPrimary(f"Snapshot: shard {self.shard.shard_index} here is not a serving primary")
        except Exception as e:  # noqa: BLE001
            self._abort(context, e)
        with repl.order:  # no push is acknowledged until the joiner is forwarded them too
            with self.shard._lock:
                parts = {"rows": self.shard.values.copy(), **{k: v.copy() for k, v in self.shard.optimizer.state().items()}}
            for part, arr in parts.items():
                per_row = max(1, arr[:1].nbytes)
                step = max(1, (self.max_message_bytes // 2) // per_row)
                for a in range(0, max(1, arr.shape[0]), step):
                    dtype = self.shard.store.dtype if part == "rows" else None
                    yield pb.SnapshotChunk(part=part, row_offset=a, primary=repl.index,
                                           data=codec.encode(arr[a:a + step], dtype))
            done = repl.applied_items()  # ~30 B each, at most `remember` (100k) of them
            yield pb.SnapshotChunk(part="applied", primary=repl.index, applied_ids=[k for k, _ in done],
                                   applied_rows=[n for _, n in done])
            repl.join(request.join_index, request.join_address)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        d = self.shard.describe()
        c = d["counters"]
        return pb.DescribeResponse(
            fingerprint=d["fingerprint"], shard_index=d["shard_index"], num_shards=d["num_shards"],
            row_start=d["row_start"], row_stop=d["row_stop"], dim=d["dim"], dtype=d["dtype"],
            optimizer=d["optimizer"], resident_bytes=d["bytes"], resident_rows=d["resident_rows"],
            max_message_bytes=self.max_message_bytes, max_ids_per_request=self.max_ids_per_request,
            counters=pb.ShardCounters(lookups=c["lookups"], rows_served=c["rows_served"],
                                      bytes_served=self.bytes_served, updates=c["updates"],
                                      rows_updated=c["rows_updated"], rejected=c["rejected"],
                                      lookup_seconds=self.lookup_seconds,
                                      lookup_p50_ms=1e3 * (self.latency.quantile(0.5) or 0.0),
                                      lookup_p99_ms=1e3 * (self.latency.quantile(0.99) or 0.0),
                                      uptime_s=time.monotonic() - self.started),
            rss_bytes=rss_bytes(),
            role="single" if self.replication is None else self.replication.role,
            replica=0 if self.replication is None else self.replication.index,
            primary=0 if self.replication is None else self.replication.primary,
            backups=[] if self.replication is None or self.replication.role != "primary"
            else self.replication.backups)

    def Save(self, request: pb.SaveRequest, context: grpc.ServicerContext) -> pb.SaveResponse:
        try:
            if not request.directory:
                if self.recovery_save is None:
                    raise InvalidRequest("Save: directory is empty and this shard has no checkpoint_dir; "
                                         "give a path on the shard's node")
                path = self.recovery_save()
            else:
                path = self.shard.save(request.directory).path
        except OSError as e:
            self._abort(context, InvalidRequest(f"Save: cannot write {request.directory!r}: {e}"))
        except Exception as e:  # noqa: BLE001
            self._abort(context, e)
        return pb.SaveResponse(header_path=path, sha256=self.shard.checksum())
