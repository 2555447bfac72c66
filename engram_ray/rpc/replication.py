"""Primary-backup replication of one shard's updates: reads from any copy, writes to all.

The copies of a shard are its replicas ``0..R-1``; ``peers[r]`` is replica ``r``'s address.
One of them, the primary (replica 0 until it fails), orders the updates: a client pushes to
the primary, which applies the push and forwards it to every other replica before it acks,
one push at a time, so every replica in sync applies the same pushes in the same order, and
an acknowledged push is on every replica in sync. A backup whose connection fails
(UNAVAILABLE: its process is gone) is dropped from the set in sync, and pushes go on; one
that answers too slowly fails the push instead (UNAVAILABLE to the client, which retries).
A restarted replica first copies the primary's state (Snapshot) and is back in sync from
then on. Limit: a backup that is alive but cut off from the primary (a network partition)
would keep serving reads of rows that stop changing; on one cluster network a refused
connection means a dead process, which is what this handles.

A push carries a request id; every replica remembers the ids it applied, so a push retried
after a failover (it may have reached some replicas) is applied once everywhere. A backup
that gets a push from a client checks the primary: alive, it refers the client to it
(FAILED_PRECONDITION); unreachable, it becomes the primary itself (every copy holds every
acknowledged push, so any survivor may take over).
"""

from __future__ import annotations

import collections
import logging
import threading

import grpc

from .auth import auth_metadata
from .generated import engram_pb2 as pb
from .generated import engram_pb2_grpc as pb_grpc

__all__ = ["Replication", "fetch_snapshot", "NOT_REPLICATED", "SYNCING", "PRIMARY_IS"]

log = logging.getLogger(__name__)

# Markers in status details that clients act on (the shard writes them, the client reads them).
#: UNAVAILABLE from a primary: the push is applied there but not yet on every copy; retry it.
NOT_REPLICATED = "not on every replica"
#: UNAVAILABLE from a copy that is still copying the primary's rows: use another copy.
SYNCING = "copying its rows"
#: FAILED_PRECONDITION from a backup: ``primary=<r>`` names the copy that takes pushes.
PRIMARY_IS = "primary="


class Replication:
    """Replica ``index`` of a shard whose copies serve at ``peers``."""

    def __init__(self, index: int, peers: list[str], *, token: str | None = None,
                 tls_ca: bytes | None = None, timeout: float = 5.0, remember: int = 100_000):
        if not 0 <= index < len(peers):
            raise ValueError(f"replica index {index} outside {len(peers)} peers")
        self.index, self.peers = int(index), list(peers)
        self.primary = 0
        #: Replicas a primary forwards pushes to (all the others, until one is found dead).
        self.in_sync: set[int] = set(range(len(self.peers))) - {self.index}
        self.timeout = float(timeout)
        #: Serialises pushes on a primary (and snapshots): the one order every replica sees.
        self.order = threading.Lock()
        self._metadata = auth_metadata(token)
        self._creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
        self._stubs: dict[str, pb_grpc.EngramMemoryStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        # request id -> (rows updated, forwarded to every backup); oldest forgotten first
        self._applied: collections.OrderedDict[str, tuple[int, bool]] = collections.OrderedDict()
        self._remember = int(remember)

    @property
    def role(self) -> str:
        return "primary" if self.primary == self.index else "backup"

    @property
    def backups(self) -> list[str]:
        return [self.peers[r] for r in sorted(self.in_sync)]

    def stub(self, address: str) -> pb_grpc.EngramMemoryStub:
        if address not in self._stubs:
            ch = (grpc.secure_channel(address, self._creds) if self._creds is not None
                  else grpc.insecure_channel(address))
            self._channels[address] = ch
            self._stubs[address] = pb_grpc.EngramMemoryStub(ch)
        return self._stubs[address]

    # Push bookkeeping (call under `order`) ------------------------------------------------
    def applied(self, request_id: str) -> tuple[int, bool] | None:
        return self._applied.get(request_id) if request_id else None

    def record(self, request_id: str, rows: int, forwarded: bool) -> None:
        if request_id:
            self._applied[request_id] = (rows, forwarded)
            self._applied.move_to_end(request_id)
            while len(self._applied) > self._remember:
                self._applied.popitem(last=False)

    def applied_items(self) -> list[tuple[str, int]]:
        """(request id, rows updated) of the pushes remembered (call under ``order``)."""
        return [(k, v[0]) for k, v in self._applied.items()]

    def seed(self, items: list[tuple[str, int]]) -> None:
        """A joiner remembers the pushes already in the rows it copied: forwarded again (a
        retry), they are acknowledged, not applied a second time."""
        for rid, rows in items:
            self.record(rid, rows, True)

    def forward(self, request: pb.ApplyGradientsRequest) -> str | None:
        """Send ``request`` to every backup in sync; None if each applied it (or was found
        dead and dropped), else what failed."""
        fwd = pb.ApplyGradientsRequest()
        fwd.CopyFrom(request)
        fwd.forwarded, fwd.primary = True, self.index
        for r in sorted(self.in_sync):
            address = self.peers[r]
            try:
                self.stub(address).ApplyGradients(fwd, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and SYNCING not in (e.details() or ""):
                    log.warning("replica %d: backup %d at %s is gone (%s); dropped until it rejoins",
                                self.index, r, address, e.details())
                    self.in_sync.discard(r)
                    continue
                return f"replica {r} at {address}: {e.code().name}: {e.details()}"
        return None

    # Roles -------------------------------------------------------------------------------
    def primary_alive(self) -> bool:
        """Does the primary answer (1 s), as a primary? (A copy restarting at its address
        answers as something else until it has rejoined.)"""
        try:
            info = self.stub(self.peers[self.primary]).Describe(pb.DescribeRequest(), timeout=1.0,
                                                               metadata=self._metadata)
            return info.role == "primary"
        except grpc.RpcError:
            return False

    def promote(self) -> None:
        log.warning("replica %d: primary %d at %s is unreachable; taking over as primary",
                    self.index, self.primary, self.peers[self.primary])
        self.primary = self.index
        self.in_sync = set(range(len(self.peers))) - {self.index}  # forwards prune the dead

    def join(self, index: int, address: str) -> None:
        """A (re)started replica at ``address`` is in sync from now on."""
        if 0 <= index < len(self.peers) and index != self.index:
            self.peers[index] = address
            self.in_sync.add(index)
            # A channel to the address of the copy that died may sit in gRPC's reconnect
            # backoff and fail at once: the joiner gets a fresh one.
            old = self._channels.pop(address, None)
            self._stubs.pop(address, None)
            if old is not None:
                old.close()


def fetch_snapshot(address: str, fingerprint: str, join_index: int, join_address: str, *,
                   store_dtype: str, token: str | None = None, tls_ca: bytes | None = None,
                   timeout: float = 3600.0, max_message_bytes: int = 64 << 20
                   ) -> tuple[dict[str, "np.ndarray"], int]:
    """Copy a primary's rows and optimiser state for a joining replica: ``(arrays, primary)``
    with ``arrays`` keyed "rows", "adam_m", "adam_v", "adam_steps" (those present), and
    "applied": the (request id, rows) pairs of the pushes in those rows."""
    import numpy as np

    from . import codec

    opts = [("grpc.max_receive_message_length", max_message_bytes)]
    creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
    channel = (grpc.secure_channel(address, creds, options=opts) if creds is not None
               else grpc.insecure_channel(address, options=opts))
    dtypes = {"rows": ((store_dtype,), 2), "adam_m": (("float32",), 2), "adam_v": (("float32",), 2),
              "adam_steps": (("int64",), 1)}
    pieces: dict[str, list] = collections.defaultdict(list)
    applied: list[tuple[str, int]] = []
    primary = -1
    try:
        stream = pb_grpc.EngramMemoryStub(channel).Snapshot(
            pb.SnapshotRequest(fingerprint=fingerprint, join_address=join_address, join_index=join_index),
            timeout=timeout, metadata=auth_metadata(token))
        for chunk in stream:
            if chunk.part == "applied":
                applied.extend(zip(chunk.applied_ids, chunk.applied_rows))
                continue
            if chunk.part not in dtypes:
                raise ValueError(f"snapshot from {address}: unknown part {chunk.part!r}")
            kinds, ndim = dtypes[chunk.part]
            pieces[chunk.part].append((chunk.row_offset, codec.decode(chunk.data, what=chunk.part,
                                                                      dtypes=kinds, ndim=ndim)))
            primary = chunk.primary
    finally:
        channel.close()
    arrays: dict = {k: np.concatenate([a for _, a in sorted(v, key=lambda t: t[0])]) for k, v in pieces.items()}
    arrays["applied"] = applied
    return arrays, primary
