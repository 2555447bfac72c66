"""Shared-secret token auth for the data plane: a server interceptor and the client's metadata.

The token is generated at deploy time and handed to clients through the service handle; it
travels as ``authorization: Bearer <token>`` gRPC metadata on every call (over TLS when the
service has a certificate, so it is not readable on the wire). The health service stays open:
it says only whether a shard serves.
"""

from __future__ import annotations

import hmac
from typing import Callable

import grpc

__all__ = ["TokenAuth", "auth_metadata", "METADATA_KEY"]

METADATA_KEY = "authorization"
_GUARDED = "/engram.v1.EngramMemory/"


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata a client sends with ``token`` (None: no auth)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else None


class TokenAuth(grpc.ServerInterceptor):
    """Refuses EngramMemory calls without the right token with UNAUTHENTICATED, before any
    handler runs; ``on_reject`` counts them."""

    def __init__(self, token: str, on_reject: Callable[[], None] = lambda: None):
        if not token:
            raise ValueError("TokenAuth: empty token")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(_GUARDED):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY)
        if got is not None and hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        reason = "no token" if got is None else "a wrong token"
        on_reject = self._on_reject

        def deny(_request, context):
            on_reject()
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{method} with {reason}: this memory service needs its token "
                          "(attach(name).client() passes it)")
        return grpc.unary_unary_rpc_method_handler(deny)
