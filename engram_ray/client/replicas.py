"""``ReplicaSet``: the copies of every shard a client talks to, and which copy gets what.

Per shard the client knows the addresses of its copies (one for an unreplicated service), a
channel and stub to each, the copy reads go to now (``read``) and the copy it sends pushes to
(``primary``: the copy that orders them; a backup names it when a push reaches it). A read
that fails moves to the next copy at once; a copy whose address changed (a restarted shard may
serve elsewhere) is found through the resolver and gets a fresh channel.

All of it runs on the client's I/O thread: the ``async`` methods open ``grpc.aio`` channels,
which belong to the event loop they were opened on. ``SyncStubs`` are the exception: blocking
stubs for a caller's own thread (a lookup agent's answer to a first Engram layer).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ..rpc.generated import engram_pb2_grpc as pb_grpc

__all__ = ["ReplicaSet", "Resolver", "SyncStubs", "channel_options"]

log = logging.getLogger(__name__)

#: Returns every shard's current address, or the list of its copies' addresses.
Resolver = Callable[[], Sequence[Any]]


def channel_options(max_message_bytes: int, tls_server_name: str | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options of a client: its message limit either way (and a TLS name)."""
    opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                   ("grpc.max_send_message_length", max_message_bytes)]
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    return opts


def _copies(entry: Any) -> list[str]:
    """A shard's copies' addresses, from one address or a list of them."""
    return [entry] if isinstance(entry, str) else list(entry)


class ReplicaSet:
    """``addresses[i]``: shard ``i``'s address, or the addresses of its copies."""

    def __init__(self, addresses: Sequence[Any], options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None = None):
        if not addresses:
            raise ValueError("EngramClient: no shard addresses")
        #: Per shard, the addresses of its copies.
        self.replicas = [_copies(a) for a in addresses]
        if not all(self.replicas):
            raise ValueError("EngramClient: a shard with no replica address")
        #: Per shard, the address of the copy reads go to now (it moves on failover).
        self.addresses = [r[0] for r in self.replicas]
        self.read = [0] * len(self.replicas)
        self.primary = [0] * len(self.replicas)  # where pushes go: the copy that orders them
        self._options, self._credentials = options, credentials
        #: Every channel ever opened, closed at shutdown (the client's finalizer holds it).
        self.channels: list[Any] = []
        self._stubs: list[list[pb_grpc.EngramMemoryStub]] = []

    @property
    def num_shards(self) -> int:
        return len(self.replicas)

    def copies(self, shard: int) -> int:
        return len(self.replicas[shard])

    def _channel(self, address: str) -> Any:
        ch = (grpc.aio.secure_channel(address, self._credentials, options=self._options)
              if self._credentials is not None else grpc.aio.insecure_channel(address, options=self._options))
        self.channels.append(ch)
        return ch

    async def open(self) -> None:
        """A channel and a stub to every copy (on the I/O thread's loop)."""
        self._stubs = [[pb_grpc.EngramMemoryStub(self._channel(a)) for a in reps] for reps in self.replicas]

    # Which copy ------------------------------------------------------------------------------
    def where(self, every_replica: bool = False) -> list[tuple[int, int]]:
        """``(shard, copy)`` pairs: the copy reads go to for each shard, or every copy."""
        return [(s, r) for s, reps in enumerate(self.replicas) for r in range(len(reps))
                if every_replica or r == self.read[s]]

    def target(self, shard: int, push: bool) -> int:
        """The copy a call goes to: the primary for pushes, the read copy otherwise."""
        return self.primary[shard] if push else self.read[shard]

    def stub(self, shard: int, copy: int) -> pb_grpc.EngramMemoryStub:
        return self._stubs[shard][copy]

    def use_read(self, shard: int, copy: int) -> None:
        self.read[shard] = copy
        self.addresses[shard] = self.replicas[shard][copy]

    def redirect(self, shard: int, copy: int) -> None:
        """Send pushes to ``copy``: a backup named it the primary."""
        self.primary[shard] = copy

    def fail_over(self, shard: int, push: bool, failed: int) -> None:
        """Move reads (or pushes) of ``shard`` from copy ``failed`` to the next copy."""
        nxt = (failed + 1) % self.copies(shard)
        if push:
            self.primary[shard] = nxt
        else:
            self.use_read(shard, nxt)

    async def reresolve(self, shard: int, resolver: Resolver) -> int:
        """Ask ``resolver`` where ``shard``'s copies serve now; a copy that moved gets a fresh
        channel. Returns how many moved (0 when the resolver itself failed)."""
        loop = asyncio.get_running_loop()
        try:
            now = list(await loop.run_in_executor(None, resolver))
            want = _copies(now[shard])
        except Exception as e:  # noqa: BLE001 - the directory may be briefly unreachable too
            log.warning("resolving shard addresses failed: %s", e)
            return 0
        moved = 0
        for r, address in enumerate(want[:self.copies(shard)]):
            if address != self.replicas[shard][r]:
                log.warning("shard %d replica %d moved: %s -> %s", shard, r, self.replicas[shard][r], address)
                self.replicas[shard][r] = address
                self._stubs[shard][r] = pb_grpc.EngramMemoryStub(self._channel(address))
                moved += 1
        self.addresses[shard] = self.replicas[shard][self.read[shard]]
        return moved


class SyncStubs:
    """Blocking stubs by address, over synchronous gRPC channels (safe from any thread),
    opened when an address is first asked for; a copy that moved gets its own when asked."""

    def __init__(self, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None = None):
        self._options, self._credentials = options, credentials
        self._lock = threading.Lock()
        self._stubs: dict[str, pb_grpc.EngramMemoryStub] = {}
        self._channels: list[grpc.Channel] = []
        self._closed = False

    def __call__(self, address: str) -> pb_grpc.EngramMemoryStub:
        stub = self._stubs.get(address)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise RuntimeError("this client is closed")
            if address not in self._stubs:
                ch = (grpc.secure_channel(address, self._credentials, options=self._options)
                      if self._credentials is not None else grpc.insecure_channel(address, options=self._options))
                self._channels.append(ch)
                self._stubs[address] = pb_grpc.EngramMemoryStub(ch)
            return self._stubs[address]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for ch in self._channels:
                ch.close()
            self._channels, self._stubs = [], {}
