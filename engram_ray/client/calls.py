"""``ShardCalls``: one RPC to a shard, with failover, redirects, retries and backoff; failures
become the project's exceptions.

Reads go to any copy and move to the next one at once when theirs fails; pushes go to the
primary, and a backup that gets one names the primary in a structured signal
(:mod:`engram_ray.rpc.wire`), which is all the client acts on besides the status code: the
details are text for people. Lookups are retried on UNAVAILABLE and DEADLINE_EXCEEDED, pushes
(not idempotent on their own, though shards remember their request ids) only on UNAVAILABLE,
and every call when the shard says it is busy. With a resolver, a shard that stays unavailable
after the retries is looked up again and waited for (it may be restarting) for up to
``recover_timeout`` seconds, then the call fails with :class:`ShardUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from ..errors import AuthError, EngramError, FingerprintMismatch, InvalidRequest, RequestTooLarge, ShardUnavailable
from ..rpc import wire
from .replicas import ReplicaSet, Resolver

__all__ = ["ShardCalls"]

_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
           grpc.StatusCode.FAILED_PRECONDITION: FingerprintMismatch,
           grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLarge,
           grpc.StatusCode.UNAUTHENTICATED: AuthError}
_LOOKUP_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_PUSH_RETRY = (grpc.StatusCode.UNAVAILABLE,)
#: Redirects one push may follow per copy of its shard (backups that keep naming each other).
_HOPS_PER_COPY = 4


class _Attempts:
    """Where one call stands: retries spent, copies tried since the last retry, redirects."""

    def __init__(self) -> None:
        self.retries = self.tried = self.hops = 0
        self.give_up: float | None = None


class ShardCalls:
    """Calls to the shards of ``replicas``, ``timeout`` seconds each, with ``metadata`` (the
    token); ``count(key, n)`` adds to the client's counters."""

    def __init__(self, replicas: ReplicaSet, *, timeout: float, retries: int, backoff: float,
                 metadata: wire.Metadata | None, resolver: Resolver | None, recover_timeout: float,
                 count: Callable[[str, int], None]):
        self.replicas = replicas
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.metadata, self.resolver, self.recover_timeout = metadata, resolver, float(recover_timeout)
        self._count = count

    async def call(self, shard: int, method: str, request: Any) -> Any:
        """``method`` (Lookup or ApplyGradients) on ``shard``, with failover and retries."""
        push = method == "ApplyGradients"
        at = _Attempts()
        while True:
            r = self.replicas.target(shard, push)
            try:
                stub_method = getattr(self.replicas.stub(shard, r), method)  # the stub may have moved
                return await stub_method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                await self._after(shard, push, r, err, at)

    async def _after(self, shard: int, push: bool, r: int, err: grpc.RpcError, at: _Attempts) -> None:
        """Decide what follows the failure ``err`` of copy ``r``: return to try again (after
        a redirect, failover or backoff), or raise the error the caller gets."""
        code, sig = err.code(), wire.signal_of(err)
        n_rep = self.replicas.copies(shard)
        if push and sig.name == wire.NOT_PRIMARY and at.hops < _HOPS_PER_COPY * n_rep:
            self.replicas.redirect(shard, self._named_primary(shard, sig, err))
            at.hops += 1
            self._count("redirects", 1)
            return
        busy = sig.name == wire.BUSY
        if not (code in (_PUSH_RETRY if push else _LOOKUP_RETRY) or busy):
            raise self.error(shard, err) from None
        pending = push and sig.name == wire.UNREPLICATED  # the primary is fine: retry it
        if n_rep > 1 and not busy and not pending and at.tried < n_rep - 1:
            self.replicas.fail_over(shard, push, r)  # the next copy, at once
            at.tried += 1
            self._count("failovers", 1)
            return
        at.tried = 0
        if at.retries < self.retries:
            self._count("retries", 1)
            await asyncio.sleep(self.backoff * (2 ** at.retries))
            at.retries += 1
            return
        if self.resolver is None or busy:
            raise self.error(shard, err) from None
        now = time.monotonic()
        at.give_up = at.give_up or now + self.recover_timeout
        if now > at.give_up:
            raise self.error(shard, err) from None
        self._count("retries", 1)
        self._count("re_resolved", await self.replicas.reresolve(shard, self.resolver))
        await asyncio.sleep(min(1.0, self.backoff * (2 ** at.retries)))

    def _named_primary(self, shard: int, sig: wire.Signal, err: grpc.RpcError) -> int:
        """The copy a backup named as the primary, checked against the shard's copies."""
        n_rep = self.replicas.copies(shard)
        index = wire.primary_index(sig, n_rep)
        if index is None:
            raise EngramError(f"shard {shard} ({self.replicas.addresses[shard]}) named primary {sig.primary!r}; "
                              f"expected a replica index below {n_rep} (details: {(err.details() or '')[:200]!r})")
        return index

    async def each(self, where: list[tuple[int, int]], method: str, request: Any, timeout: float,
                   wait_for_ready: bool = False) -> list[Any]:
        """``method`` on each ``(shard, copy)`` at once, no retries: answers or RpcErrors."""
        stubs = [self.replicas.stub(s, r) for s, r in where]
        return await asyncio.gather(
            *[getattr(stub, method)(request, timeout=timeout, wait_for_ready=wait_for_ready, metadata=self.metadata)
              for stub in stubs], return_exceptions=True)

    def raise_failed(self, where: list[tuple[int, int]], answers: list[Any]) -> None:
        """Raise the project's exception for the first failed answer of the copies ``where``."""
        for (i, _), r in zip(where, answers):
            if isinstance(r, BaseException):
                raise self.error(i, r) from None

    def error(self, shard: int, err: BaseException) -> BaseException:
        """The project's exception for ``err`` from ``shard`` (other exceptions as they are)."""
        if not isinstance(err, grpc.RpcError):
            return err
        code, details, sig = err.code(), err.details(), wire.signal_of(err)
        self._count("errors", 1)
        address = self.replicas.addresses[shard]
        if sig.name == wire.BUSY:  # overloaded, not a request too large: a transient failure
            return ShardUnavailable(shard, address, f"busy (at its limit of calls) after {self.retries} retries")
        if sig.name == wire.NOT_PRIMARY:  # only after the redirects ran out
            return EngramError(f"shard {shard} ({address}): its copies keep naming another copy as the "
                               f"primary (a redirect loop); last refusal: {details}")
        if code in _ERRORS:
            return _ERRORS[code](f"shard {shard} ({address}): {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ShardUnavailable(shard, address, f"{code.name} after {self.retries} retries: {details}")
        return EngramError(f"shard {shard} ({address}): {code.name}: {details}")
