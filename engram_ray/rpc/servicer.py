"""``ShardServicer``: decode -> :class:`TableShard` -> encode, and errors as status codes.

Thin on purpose: validation of ids and values lives in the shard, wire validation in the
codec, the order of pushes in :class:`~.replication.Replication` (or
:class:`~.replication.SingleCopy` for a shard's only copy), who may call at all in
:class:`~.auth.CallGate`; this class maps their exceptions onto gRPC status codes and the
signals of :mod:`.wire`, keeps the copy's serving state, and counts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
import numpy as np

from ..config import FLOAT_DTYPES
from ..core.optim import lr_error
from ..core.usage import RowUsage
from ..errors import (
    CheckpointError,
    FingerprintMismatch,
    InvalidRequest,
    NotPrimary,
    NotServing,
    RequestTooLarge,
    Unreplicated,
)
from ..store import TableShard
from ..store.checkpoint import open_under
from . import codec, wire
from .generated import engram_pb2 as pb
from .generated import engram_pb2_grpc as pb_grpc
from .metrics import LatencyHistogram, rss_bytes
from .pushlog import PushLog, check_request_id
from .replication import Replication, SingleCopy

__all__ = ["ShardServicer", "SERVING", "SYNCING_STATE", "REFUSING"]

log = logging.getLogger(__name__)

#: The copy serves (Describe ``state``).
SERVING = "serving"
#: The copy is copying the primary's rows; data calls get UNAVAILABLE.
SYNCING_STATE = "syncing"
#: None of the copy's recovery checkpoints loads; data calls get UNAVAILABLE until an operator decides.
REFUSING = "refusing"
#: Bytes a push grows by when a primary forwards it (ForwardRequest's own fields, with room).
FORWARD_OVERHEAD = 64

_STATUS = ((NotPrimary, grpc.StatusCode.FAILED_PRECONDITION),
           (Unreplicated, grpc.StatusCode.UNAVAILABLE),
           (NotServing, grpc.StatusCode.UNAVAILABLE),
           (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
           (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
           (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
           (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
           (ValueError, grpc.StatusCode.INVALID_ARGUMENT))


class ShardServicer(pb_grpc.EngramMemoryServicer):
    """Serves one :class:`TableShard` as ``engram.v1.EngramMemory``."""

    def __init__(self, shard: TableShard, max_message_bytes: int, *,
                 max_ids_per_request: int = wire.DEFAULT_MAX_IDS_PER_REQUEST,
                 recovery_save: Callable[[], tuple[str, str]] | None = None,
                 observer: Callable[[str, float, int, bool], None] | None = None,
                 save_root: str = "", dedup_window_s: float = 600.0):
        self.shard = shard
        #: Which rows the lookups read: distinct rows per (layer, order) table, read skew.
        self.usage = RowUsage(shard.layout, shard.row_start, shard.row_stop) if shard.layout is not None else None
        #: Called after each Lookup / ApplyGradients as (method, seconds, rows, ok), e.g. to
        #: export metrics; must be cheap and must not raise.
        self.observer = observer
        self.latency = LatencyHistogram()
        self.started = time.monotonic()
        #: Replication of this shard's pushes (None: the only copy).
        self.replication: Replication | None = None
        #: SERVING, SYNCING_STATE or REFUSING (see the module constants).
        self.state = SERVING
        #: With REFUSING: what is wrong and what an operator can do (the data calls' error).
        self.refusal = ""
        #: Where the rows came from, and what went wrong on the way (Describe).
        self.rows_from: str = "init"
        self.notes: list[str] = []
        #: Request ids of the pushes applied here (shared with the replication, if any).
        self.pushlog = PushLog(window_s=dedup_window_s)
        #: Pushes while there is no replication: the only copy, each applied once per id.
        self.single = SingleCopy(shard, self.pushlog)
        #: Save with no directory: write a recovery checkpoint, returning (its directory, the
        #: sha256 of its rows) (None: the shard has no checkpoint_dir; such a Save is refused).
        self.recovery_save = recovery_save
        #: Save with a directory writes only below this root ("" : such saves are refused).
        self.save_root = save_root
        self.max_message_bytes = int(max_message_bytes)
        self.max_ids_per_request = int(max_ids_per_request)
        self.bytes_served = 0
        self.lookup_seconds = 0.0
        self._lock = threading.Lock()

    # State ---------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def refuse(self, why: str) -> None:
        """Stop serving data calls (Describe still answers, with ``why``)."""
        self.state, self.refusal = REFUSING, why

    def _check_serving(self) -> None:
        if self.state == SYNCING_STATE:
            raise Unreplicated(f"replica of shard {self.shard.shard_index} is copying its rows from the "
                               "primary; use another replica", syncing=True)
        if self.state == REFUSING:
            raise NotServing(self.refusal)

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

    def decode_push(self, request: pb.ApplyGradientsRequest) -> tuple:
        """Ids ``[n]`` and gradients ``[n, dim]`` of a push, checked on the wire's terms."""
        self._check_fingerprint(request.fingerprint)
        check_request_id(request.request_id)
        if request.ByteSize() + FORWARD_OVERHEAD > self.max_message_bytes:
            raise RequestTooLarge(f"push of {request.ByteSize()} B: a backup must receive it within the "
                                  f"{self.max_message_bytes} B message limit; split it")
        if request.lr and lr_error(request.lr):  # 0: the shard's own rate
            raise InvalidRequest(f"push with {lr_error(request.lr)}, or 0 for the shard's own")
        ids = codec.decode(request.row_ids, what="row_ids", dtypes=("int64",), ndim=1)
        self._check_count(ids.size, "gradient push")
        # gradients travel in any storage dtype; the shard widens them to float32
        grads = codec.decode(request.grads, what="grads", ndim=2, dtypes=FLOAT_DTYPES)
        return ids, grads

    def _observe(self, method: str, t0: float, rows: int, ok: bool, took: float | None = None) -> None:
        if self.observer is not None:
            try:
                self.observer(method, time.perf_counter() - t0 if took is None else took, rows, ok)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.debug("observer failed", exc_info=True)

    def abort(self, context: grpc.ServicerContext, exc: Exception) -> NoReturn:
        """End the call with ``exc`` as its status code, and its signal (:mod:`.wire`) in the
        trailing metadata (counted as a rejection)."""
        self.count_rejected()
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                signal = wire.metadata_for(exc)
                if signal is not None:
                    context.set_trailing_metadata(signal)
                context.abort(code, str(exc))
        log.exception("shard %d: unexpected error", self.shard.shard_index)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: grpc's context.abort() raises")

    # RPCs ---------------------------------------------------------------------------------
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        t0 = time.perf_counter()
        resp, ids, nbytes = self._lookup(request, context, t0)
        self._served(ids, nbytes, t0)
        return resp

    def LookupStream(self, request_iterator: Iterator[pb.LookupRequest],
                     context: grpc.ServicerContext) -> Iterator[pb.LookupResponse]:
        """Each request answered as :meth:`Lookup` answers it, in order; the first error ends
        the stream with Lookup's status. Runs on the gate's stream threads (:mod:`.auth`).
        A request's bookkeeping (counters, read usage, metrics) runs once its answer has left:
        gRPC asks for the next answer only after sending this one. Exporting a request to
        Ray's metrics alone took 37 us (median; p90 79 us) on the memory core between decode
        steps, on the first Engram layer's critical path."""
        left = context.time_remaining()  # without a deadline: None, or (grpc 1.85) ~2**63 s
        if left is None or left > wire.MAX_STREAM_S + 1.0:  # (1 s: the deadline's travel)
            what = "no deadline" if left is None or left > 1e9 else f"a deadline {left:.0f} s away"
            self.abort(context, InvalidRequest(
                f"LookupStream with {what}: a "
                f"stream holds a thread of the shard, so it must end within {wire.MAX_STREAM_S:.0f} s; "
                "set a deadline and open a new stream after it"))
        limit = min(self.max_message_bytes, wire.MAX_STREAM_ANSWER_BYTES)
        for request in request_iterator:
            t0 = time.perf_counter()
            resp, ids, nbytes = self._lookup(request, context, t0, limit)
            took = time.perf_counter() - t0
            try:
                yield resp
            finally:  # once, however the stream goes on: also when it is cancelled right after
                self._served(ids, nbytes, t0, took)

    def _lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext, t0: float,
                max_bytes: int | None = None) -> tuple[pb.LookupResponse, np.ndarray, int]:
        """One lookup's answer (``seq`` echoed), its ids and its rows' bytes, after every
        check; an error aborts the call (counted). ``max_bytes``: the answer's limit (None:
        the message limit; a LookupStream's is smaller)."""
        try:
            self._check_fingerprint(request.fingerprint)
            ids = codec.decode(request.row_ids, what="row_ids", dtypes=("int64",), ndim=1)
            self._check_count(ids.size, "lookup")
            self._check_serving()
            size = ids.size * self.shard.row_bytes
            if size + 1024 > self.max_message_bytes:
                raise RequestTooLarge(
                    f"lookup of {ids.size} rows x {self.shard.row_bytes} B = {size} B exceeds the "
                    f"shard's {self.max_message_bytes} B message limit; split the request")
            if max_bytes is not None and size > max_bytes:
                raise RequestTooLarge(f"lookup of {size} B of rows on a LookupStream, whose answers are at most "
                                      f"{max_bytes} B; send it by Lookup")
            # read before the gather: rows at least as new as the version they are labelled with
            # (a push landing meanwhile shows in the next answer's version: a cache drops them)
            version = self.shard.rows_version
            rows = self.shard.gather(ids)
        except Exception as e:  # noqa: BLE001 - every error becomes a status code
            self._observe("Lookup", t0, 0, False)
            self.abort(context, e)
        resp = pb.LookupResponse(rows=codec.encode(rows, self.shard.store.dtype), update_count=version,
                                 seq=request.seq)
        return resp, ids, rows.nbytes

    def _served(self, ids: np.ndarray, nbytes: int, t0: float, took: float | None = None) -> None:
        """A served lookup's bookkeeping: read usage, bytes, seconds, latency, the observer."""
        took = time.perf_counter() - t0 if took is None else took
        if self.usage is not None:
            try:
                self.usage.add(ids)
            except Exception:  # noqa: BLE001 - statistics never fail a lookup that succeeded
                log.warning("recording the lookup's rows for table use failed", exc_info=True)
        with self._lock:  # handlers run on a thread pool
            self.bytes_served += nbytes
            self.lookup_seconds += took
        self.latency.record(took)
        self._observe("Lookup", t0, ids.size, True, took)

    def ApplyGradients(self, request: pb.ApplyGradientsRequest,
                       context: grpc.ServicerContext) -> pb.ApplyGradientsResponse:
        t0 = time.perf_counter()
        try:
            ids, grads = self.decode_push(request)
            self._check_serving()
            order = self.replication if self.replication is not None else self.single
            n = order.push(request, ids, grads)
        except Exception as e:  # noqa: BLE001
            self._observe("ApplyGradients", t0, 0, False)
            self.abort(context, e)
        self._observe("ApplyGradients", t0, n, True)
        return pb.ApplyGradientsResponse(rows_updated=n, update_count=self.shard.rows_version)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        d = self.shard.describe()
        c = d["counters"]
        repl = self.replication
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
            role="single" if repl is None else repl.role,
            replica=0 if repl is None else repl.index,
            primary=0 if repl is None else repl.primary,
            backups=[] if repl is None or repl.role != "primary" else repl.backups,
            state=self.state, rows_from=self.rows_from, storage=d["storage"], mapped_bytes=d["mapped_bytes"],
            mapped_resident_bytes=d["mapped_resident_bytes"],
            notes=list(self.notes) + ([self.refusal] if self.state == REFUSING else []),
            **self._usage())

    def _usage(self) -> dict:
        """Describe's read-usage fields (none for a shard made without its layout)."""
        if self.usage is None:
            return {}
        u = self.usage.report()
        return {"table_use": [pb.TableUse(layer=t["layer"], order=t["order"], rows=t["rows"], touched=t["touched"])
                              for t in u["tables"]],
                "reads_top1pct_share": u["top1pct_share"] or 0.0, "reads_top10pct_share": u["top10pct_share"] or 0.0,
                "reads": u["reads"]}

    def Save(self, request: pb.SaveRequest, context: grpc.ServicerContext) -> pb.SaveResponse:
        try:
            self._check_serving()  # never write a refusing copy's placeholder rows anywhere
            if not request.directory:
                if self.recovery_save is None:
                    raise InvalidRequest("Save: directory is empty and this shard has no checkpoint_dir; "
                                         "give a path under the service's save root")
                path, sha = self.recovery_save()
            else:
                fd, where = open_under(self.save_root, request.directory)
                try:
                    path, sha = self.shard.save(where, dir_fd=fd)
                finally:
                    os.close(fd)
        except OSError as e:
            self.abort(context, InvalidRequest(f"Save: cannot write {request.directory!r}: {e}"))
        except Exception as e:  # noqa: BLE001
            self.abort(context, e)
        return pb.SaveResponse(header_path=str(path), sha256=sha)
