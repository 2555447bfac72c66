"""``CallGate``: who may call what on a shard's port, decided before a request's body is read.

Three kinds of call reach a shard, each with its own authority and its own threads:

- ``engram.v1.EngramMemory`` (clients): needs the service token, ``authorization: Bearer
  <token>`` metadata (or the peer token), when the service has auth. At most
  ``max_concurrent_rpcs`` client calls run at once; more get RESOURCE_EXHAUSTED at once, with
  the ``busy`` signal (:mod:`.wire`: the request was not looked at, so clients back off and
  retry any call, pushes too). They run on the server's handler pool. The same calls from a peer (a
  copy asking whether this one lives, or calling a joiner back) are not counted and run on
  the peers' pool: clients that fill every slot or thread cannot make a copy look dead.
- ``engram.v1.EngramMemory/LookupStream`` (clients, with the same token): a stream holds a
  thread for its life, so streams run on a pool of their own, at most ``max_streams`` at once
  (one more is refused with RESOURCE_EXHAUSTED and ``busy``: the client uses Lookup), and never
  count against ``max_concurrent_rpcs`` nor take the calls' threads.
- ``engram.v1.EngramPeer`` (the other copies of the shard): needs the peer token, always; a
  client token is refused, so no client can act as a replica. A pool of its own, so a
  snapshot stream or a forwarded push never waits behind client lookups or takes their thread.
- ``grpc.health.v1.Health/Check``: open; answered without reading the request (see
  :func:`health_handler`).

Why before the body: gRPC Python reads a unary request's body on a handler thread, and waits
for it there. A caller that sends headers and never the body would hold that thread, and a
handful of them every thread; a large body would sit in memory before any token is checked.
So every call the gate refuses -- no token, a wrong one, over the limit -- is answered by a
client-streaming handler that never touches its request iterator, on a small pool of its own:
it costs microseconds and no body is buffered beyond gRPC's flow-control window, however the
caller stalls. Authenticated calls are admitted by the same trick: the gate counts them before
their body arrives and releases the count whatever happens to the call.

The token travels over TLS when the service has a certificate, so it is not readable on the
wire. ``hmac.compare_digest`` keeps the comparison constant-time.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2

from .wire import BUSY, METADATA_KEY, Metadata, auth_metadata, signal_metadata

__all__ = ["CallGate", "auth_metadata", "health_handler", "METADATA_KEY"]

_MEMORY = "/engram.v1.EngramMemory/"
_PEER = "/engram.v1.EngramPeer/"
_HEALTH = "/grpc.health.v1.Health/"
_STREAM = _MEMORY + "LookupStream"


def _on(pool: futures.ThreadPoolExecutor, fn: Callable) -> Callable:
    """``fn`` as a behaviour gRPC runs on ``pool`` instead of the server's handler pool."""
    def behaviour(*args):
        return fn(*args)
    behaviour.experimental_thread_pool = pool  # type: ignore[attr-defined]  # read by grpc's server
    return behaviour


def health_handler(serving: Callable[[], bool], pool: futures.ThreadPoolExecutor) -> grpc.RpcMethodHandler:
    """grpc.health.v1.Health/Check, answered without reading the request: SERVING while
    ``serving()``, NOT_SERVING otherwise, whatever service it names. (Reading the name would
    let a caller that never sends it hold a thread; the shard has one status anyway.)"""
    def check(_requests, _context):
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving()
            else health_pb2.HealthCheckResponse.NOT_SERVING)
    return grpc.stream_unary_rpc_method_handler(
        _on(pool, check), response_serializer=health_pb2.HealthCheckResponse.SerializeToString)


class CallGate(grpc.ServerInterceptor):
    """Admits EngramMemory calls with ``token`` (any call when None), EngramPeer calls with
    ``peer_token`` (none when None), at most ``max_concurrent`` EngramMemory calls at once
    (no limit when None) and ``max_streams`` lookup streams on ``stream_pool`` (none without
    one); answers health checks; refuses the rest on ``open_pool`` without reading them.
    ``on_reject`` counts refusals."""

    def __init__(self, *, token: str | None, peer_token: str | None, max_concurrent: int | None,
                 open_pool: futures.ThreadPoolExecutor, peer_pool: futures.ThreadPoolExecutor,
                 serving: Callable[[], bool], on_reject: Callable[[], None] = lambda: None,
                 stream_pool: futures.ThreadPoolExecutor | None = None, max_streams: int = 0):
        if token == "" or peer_token == "":
            raise ValueError("CallGate: an empty token; pass None for no token")
        self._client = f"Bearer {token}".encode() if token else None
        self._peer = f"Bearer {peer_token}".encode() if peer_token else None
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self._open, self._peer_pool, self._on_reject = open_pool, peer_pool, on_reject
        self._stream_pool = stream_pool
        # as many streams as the pool has threads: an admitted stream never waits for one
        self._streams = threading.BoundedSemaphore(max_streams) if stream_pool is not None and max_streams else None
        #: The contexts of the open lookup streams (:meth:`end_streams` cancels them).
        self._live: set = set()
        self._health = health_handler(serving, open_pool)

    @staticmethod
    def _is(got: bytes | None, want: bytes | None) -> bool:
        return got is not None and want is not None and hmac.compare_digest(got, want)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(_HEALTH):
            return self._health if method == _HEALTH + "Check" else None  # None: UNIMPLEMENTED
        guarded = method.startswith(_MEMORY) or method.startswith(_PEER)
        if not guarded:
            return continuation(handler_call_details)
        got = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                break
        peer = self._is(got, self._peer)
        if method.startswith(_PEER):
            if not peer:
                return self._refuse(grpc.StatusCode.UNAUTHENTICATED,
                                    f"{method} is for the copies of a shard and needs their peer token; "
                                    "clients cannot call it")
            return self._on_peer_pool(continuation(handler_call_details))
        if self._client is not None and not (peer or self._is(got, self._client)):
            reason = "no token" if got is None else "a wrong token"
            return self._refuse(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} with {reason}: this memory service needs its token "
                                "(attach(name).client() passes it)")
        handler = continuation(handler_call_details)
        if method == _STREAM and handler is not None:
            return self._streamed(handler)
        if peer:  # a copy of this shard (e.g. asking whether this one lives): never behind clients
            return self._on_peer_pool(handler)
        if handler is None or self._slots is None:
            return handler
        if not self._slots.acquire(blocking=False):
            return self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded: the shard "
                                "serves its limit of calls at once (max_concurrent_rpcs); back off and retry",
                                signal_metadata(BUSY))
        return self._counted(handler)

    def _refuse(self, code: grpc.StatusCode, details: str,
                signal: Metadata | None = None) -> grpc.RpcMethodHandler:
        on_reject = self._on_reject

        def refuse(_requests, context):  # the request iterator is never read
            on_reject()
            if signal is not None:
                context.set_trailing_metadata(signal)
            context.abort(code, details)
        return grpc.stream_unary_rpc_method_handler(_on(self._open, refuse))

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A unary handler that reads its one request itself, so the slot taken for it is
        given back in every case (body never sent, call cancelled, handler error)."""
        assert handler.unary_unary is not None, "EngramMemory methods are unary"
        assert self._slots is not None, "only a gate with a limit counts calls"
        inner, release = handler.unary_unary, self._slots.release

        def counted(requests, context):
            try:
                request = next(requests, None)
                if request is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
                return inner(request, context)
            finally:
                release()
        return grpc.stream_unary_rpc_method_handler(counted, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    def _streamed(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A lookup stream on the streams' pool, holding one of ``max_streams`` slots until its
        thread is done with it (not merely until the call ended: a thread still inside a
        lookup would make the next stream wait for it); refused when no slot is free."""
        streams, pool = self._streams, self._stream_pool
        if streams is None or pool is None:
            return self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "LookupStream refused: this shard serves no "
                                "lookup streams (max_lookup_streams=0); use Lookup", signal_metadata(BUSY))
        if not streams.acquire(blocking=False):
            return self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "LookupStream refused: the shard serves its "
                                "limit of lookup streams at once (max_lookup_streams); use Lookup",
                                signal_metadata(BUSY))
        assert handler.stream_stream is not None, "LookupStream is a bidirectional stream"
        inner, lock, live = handler.stream_stream, threading.Lock(), self._live
        state = {"held": True, "started": False, "context": None}

        def release() -> None:  # once, whoever gets here first
            with lock:
                held, state["held"] = state["held"], False
                if state["context"] is not None:
                    live.discard(state["context"])
            if held:
                streams.release()

        def body(requests, context):
            with lock:
                state["started"] = True
            try:
                yield from inner(requests, context)
            finally:
                release()

        def ended() -> None:  # the call ended: a generator that never started frees the slot now
            with lock:
                started = state["started"]
            if not started:
                release()

        def streamed(requests, context):
            with lock:
                state["context"] = context
                live.add(context)
            if not context.add_callback(ended):  # the call has ended already
                ended()
            return body(requests, context)
        return grpc.stream_stream_rpc_method_handler(_on(pool, streamed),
                                                     request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)

    def end_streams(self) -> int:
        """Cancel every open lookup stream (before the server stops: a stream a client keeps
        open would otherwise hold the stop for its whole grace); returns how many. Clients see
        CANCELLED and ask by Lookup."""
        open_now = list(self._live)
        for context in open_now:
            context.cancel()
        return len(open_now)

    def _on_peer_pool(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_on(self._peer_pool, handler.unary_unary), **kw)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_on(self._peer_pool, handler.unary_stream), **kw)
        raise AssertionError("EngramPeer methods are unary or server-streaming")
