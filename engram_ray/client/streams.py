"""``LookupStreams``: one ``LookupStream`` per shard address, for a client's direct lookups.

A node's lookup agent asks a shard for the first Engram layer's rows on its own thread, one
lookup after another (:meth:`~.transfers.Transfers.unique_now`). As unary calls each pays
gRPC's call set-up on both ends; on a stream kept open each is one message each way.
Measured on this project's 2-core box (client and one shard on the same core, a request every
15 ms as in decode, 20 KB answers): 0.45 ms a unary call against 0.29 ms a message on a
stream read by a thread, median; p90 0.77 against 0.49 ms.

Never another lookup's answer: a stream is used by one lookup at a time (its lock); each
request carries a number the shard echoes (``seq``), and an answer with another number
closes the stream; a lookup that timed out closes its stream before it lets the lock go. The
reader hands over one answer per request asked and reads at most one ahead: what a shard
sends unasked stays in gRPC's flow-control window, not in this process's memory.

A stream answers one lookup at a time. ``ask`` returns None -- use Lookup -- where a stream
cannot serve this one: another thread's lookup holds it, the shard refuses streams (an older
shard, or one at its ``max_lookup_streams``; not asked again for :data:`STREAM_RETRY_S`), or
the stream ended between lookups. A lookup that fails on its stream raises, as its call would
have. Each stream carries a deadline (a shard refuses streams without one: each holds a thread
of the shard) and is replaced before it runs out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import grpc

from ..rpc import wire
from ..rpc.generated import engram_pb2 as pb
from .replicas import SyncStubs

__all__ = ["LookupStreams", "STREAM_LIFETIME_S", "STREAM_RETRY_S"]

log = logging.getLogger(__name__)

#: A stream's deadline: within the shard's limit (:data:`~engram_ray.rpc.wire.MAX_STREAM_S`).
STREAM_LIFETIME_S = 300.0
#: A stream with less than this left is replaced before a lookup (so none runs into the end).
RENEW_BEFORE_S = 30.0
#: After a shard refused a stream, its lookups use Lookup for this long.
STREAM_RETRY_S = 30.0
#: A stream not used for this long is closed (its shard thread given back) at the next open.
IDLE_S = 60.0
#: A stream that ended so took no lookup's answer with it: the lookup is asked by a call.
_ENDED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

_END = object()  # ends a stream's request iterator


class _Ended(Exception):
    """A stream ended before it answered: ``error`` is the call's error (None: ended cleanly)."""

    def __init__(self, error: grpc.RpcError | None):
        super().__init__(str(error))
        self.error = error


class _OutOfStep(Exception):
    """The shard answered with another request's number: the stream is closed."""


class _Stream:
    """One open stream: requests in a queue gRPC's sender reads, answers from a reader thread
    that reads one per request asked."""

    def __init__(self, stub: Any, metadata: Any, lifetime: float):
        self.lock = threading.Lock()  # one lookup at a time
        self.ends_at = time.monotonic() + lifetime
        self.used = time.monotonic()
        self.alive = True
        #: How the stream ended (None: open, or ended without an error).
        self.error: grpc.RpcError | None = None
        self._seq = 0
        self._permits = threading.Semaphore(0)  # answers the reader may hand over: one per request
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = stub.LookupStream(iter(self._requests.get, _END), timeout=lifetime, metadata=metadata)
        threading.Thread(target=self._read, name="engram-lookup-stream", daemon=True).start()

    def _read(self) -> None:
        err: grpc.RpcError | None = None
        try:
            while True:
                # waits in gRPC for the next answer (as a plain reader would: no extra wake-up per
                # lookup), then keeps it until a request is out for it: a shard sending unasked
                # gets one message read, the rest stays in gRPC's flow-control window
                answer = next(self._call)
                self._permits.acquire()
                if not self.alive:  # closed
                    break
                self._answers.put(answer)
        except StopIteration:  # the shard ended the stream
            pass
        except grpc.RpcError as e:
            err = e
        finally:
            self.error = err
            self.alive = False
            self._answers.put(_Ended(err))
            self._requests.put(_END)  # gRPC's sender thread blocks on the queue: let it end too

    def ask(self, request: pb.LookupRequest, timeout: float) -> pb.LookupResponse:
        """The answer to ``request`` (the lock held); raises :class:`_Ended` or TimeoutError."""
        if not self.alive:  # ended, or closed (after a timeout a late answer may wait in the queue)
            raise _Ended(self.error)
        self.used = time.monotonic()
        self._seq += 1
        request.seq = self._seq
        self._requests.put(request)
        self._permits.release()
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.close()  # the answer may still come: this stream cannot be trusted in order
            raise TimeoutError(f"no answer on the lookup stream within {timeout} s") from None
        if isinstance(answer, _Ended):
            raise answer
        if answer.seq != self._seq:
            self.close()
            raise _OutOfStep(f"the shard answered request {answer.seq} on its LookupStream when request "
                             f"{self._seq} was asked; the stream is closed")
        return answer

    def close(self) -> None:
        self.alive = False
        self._requests.put(_END)
        self._permits.release()  # a reader waiting for one ends
        self._call.cancel()


class LookupStreams:
    """Streams by shard address over ``stubs``' channels, with ``metadata`` (the token)."""

    def __init__(self, stubs: SyncStubs, metadata: Any, lifetime: float = STREAM_LIFETIME_S):
        if not RENEW_BEFORE_S < lifetime <= wire.MAX_STREAM_S:
            raise ValueError(f"lifetime={lifetime}: expected more than {RENEW_BEFORE_S} s and at most "
                             f"{wire.MAX_STREAM_S} s (the shards' limit)")
        self._stubs, self._metadata, self._lifetime = stubs, metadata, lifetime
        self._lock = threading.RLock()  # _refusal is also called with it held
        self._streams: dict[str, _Stream] = {}
        self._refused: dict[str, float] = {}  # address -> monotonic time to try a stream again
        self._closed = False

    def ask(self, address: str, request: pb.LookupRequest, timeout: float) -> pb.LookupResponse | None:
        """The shard's answer to ``request`` over its stream; None where no stream serves it
        now (use Lookup). Raises the lookup's ``grpc.RpcError``, TimeoutError, or an error for
        an answer out of step (the stream is then closed)."""
        s = self._take(address)
        if s is None:
            return None
        try:
            return s.ask(request, timeout)
        except _Ended as e:
            s.close()
            if e.error is None or e.error.code() in _ENDED:
                return None
            if self._refusal(address, e.error):
                return None
            raise e.error from None
        finally:
            s.lock.release()

    def _refusal(self, address: str, error: grpc.RpcError | None) -> bool:
        """Whether ``error`` is the shard refusing streams (not a lookup's error); if so, the
        address gets no new stream for :data:`STREAM_RETRY_S`."""
        code = error.code() if error is not None else None
        if not (code == grpc.StatusCode.UNIMPLEMENTED or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                                          and wire.signal_of(error).name == wire.BUSY)):
            return False
        with self._lock:  # the shard refuses streams: calls, and no stream for a while
            self._refused[address] = time.monotonic() + STREAM_RETRY_S
        log.info("shard %s refused a lookup stream (%s): using Lookup for %.0f s", address, code.name,
                 STREAM_RETRY_S)
        return True

    def _take(self, address: str) -> _Stream | None:
        """The address's open stream with its lock taken (a new one if it has none, or one
        near its deadline or ended); None: no stream now (busy with another thread's lookup,
        refused lately, or this client closed)."""
        s = self._streams.get(address)
        now = time.monotonic()
        if s is not None and s.alive and s.ends_at - now > RENEW_BEFORE_S:
            if not s.lock.acquire(blocking=False):
                return None
            if s.alive:  # still: it may have been closed between the look and the lock
                return s
            s.lock.release()
        with self._lock:
            if self._closed or now < self._refused.get(address, 0.0):
                return None
            s = self._streams.get(address)
            if s is not None:
                if not s.lock.acquire(blocking=False):
                    return None  # another thread's lookup is on it: never closed under it
                if s.alive and s.ends_at - now > RENEW_BEFORE_S:
                    return s
                s.close()
                s.lock.release()
                del self._streams[address]
                if s.error is not None and self._refusal(address, s.error):
                    return None  # refused before any lookup was asked on it
            for other, t in list(self._streams.items()):  # e.g. a copy failed over from
                if now - t.used > IDLE_S and t.lock.acquire(blocking=False):
                    t.close()
                    t.lock.release()
                    del self._streams[other]
            try:
                s = _Stream(self._stubs(address), self._metadata, self._lifetime)
            except Exception:  # noqa: BLE001 - e.g. the client is closing: use Lookup
                log.debug("opening a lookup stream to %s failed", address, exc_info=True)
                return None
            s.lock.acquire()
            self._streams[address] = s
            return s

    def drop(self, address: str) -> None:
        """Close the address's stream (e.g. its answer was refused: it is not trusted again)."""
        with self._lock:
            s = self._streams.pop(address, None)
        if s is not None:
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in self._streams.values():
                s.close()
            self._streams.clear()
