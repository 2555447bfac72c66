"""Primary-backup replication of one shard's updates: reads from any copy, writes to all.

The copies of a shard are its replicas ``0..R-1``; ``peers[r]`` is replica ``r``'s address.
One of them, the primary (replica 0 until it fails), orders the updates: a client pushes to
the primary, which applies the push, numbers it (``seq``) and forwards it (EngramPeer.Forward,
with the peer token) to every other replica before it acks, one push at a time, so every
replica in sync applies the same pushes in the same order, and an acknowledged push is on
every replica in sync. A backup whose connection fails (UNAVAILABLE: its process is gone) is
dropped from the set in sync, and pushes go on; one that answers too slowly fails the push
instead (UNAVAILABLE with the ``unreplicated`` signal, so the client retries the primary).
Limit: a backup that is alive but cut off from the primary (a network partition) would keep
serving reads of rows that stop changing; on one cluster network a refused connection means a
dead process, which is what this handles.

A push carries a request id; every replica remembers the ids it applied (:class:`PushLog`), so
a push retried after a failover (it may have reached some replicas) is applied once
everywhere. A backup that gets a push from a client checks the primary: alive, it refers the
client to it (FAILED_PRECONDITION with the ``not-primary`` signal, which names the primary:
see :mod:`.wire`); unreachable, it becomes the primary itself (every copy holds every
acknowledged push, so any survivor may take over).

Joining. A restarted replica copies the primary's state (EngramPeer.Snapshot) without holding
pushes up: under its push lock the primary takes a consistent copy of rows, optimiser state and
push ids, notes the sequence number, and adds the joiner to the set in sync; then it streams
the copy with no lock held. Pushes go on meanwhile and are forwarded to the joiner, which
keeps them (:class:`JoinBuffer`) and, once the copy is in, applies those numbered above the
copy's, in order, and serves. Whether a join failed is decided on one side only, so the two
never disagree about a copy being in sync: the joiner gives a join up (its stream failed or
ran past its deadline, or what it keeps outgrew :data:`JOIN_BUFFER_BYTES`) by answering
forwards as a dead copy would, and never installs that copy; the primary then drops it, as
any dead copy, and pushes go on. The primary ends a stream that outlives ``join_timeout_s``
or is superseded by a newer join of the same copy, and stops forwarding to it. The primary
checks a join first: the peer token, and a call back to ``join_address`` that must answer as
a copy of this shard, with that replica index, copying its rows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from ..errors import EngramError, InvalidRequest, NotPrimary, NotServing, Unreplicated
from . import wire
from .generated import engram_pb2 as pb
from .generated import engram_pb2_grpc as pb_grpc
from .pushlog import PushLog

__all__ = ["Replication", "SingleCopy", "JoinBuffer", "JOIN_BUFFER_BYTES"]

if TYPE_CHECKING:
    from ..store import TableShard

log = logging.getLogger(__name__)

#: Bytes of pushes a joining copy keeps while it copies the primary's rows; beyond them it
#: gives the join up (and tries again) rather than grow without bound.
JOIN_BUFFER_BYTES = 256 << 20


def push_lr(request: pb.ApplyGradientsRequest) -> float | None:
    """The learning rate a push carries (checked by the servicer), or None: the shard's own."""
    return float(request.lr) if request.lr else None


@dataclass
class Join:
    """A copy joining through this primary (primary side), until its last chunk is sent."""

    index: int
    started: float


@dataclass
class JoinBuffer:
    """Pushes forwarded to a joining copy while it copies the primary's rows (joiner side)."""

    primary: int
    budget: int = JOIN_BUFFER_BYTES
    items: list[tuple[int, str, np.ndarray, np.ndarray, float | None]] = field(default_factory=list)
    nbytes: int = 0
    #: Why this join was given up ("" while it goes on).
    abandoned: str = ""

    def abandon(self, why: str) -> None:
        self.abandoned, self.items, self.nbytes = why, [], 0

    def keep(self, fwd: pb.ForwardRequest, ids: np.ndarray, grads: np.ndarray, shard: TableShard) -> int:
        if self.abandoned:
            raise NotServing(f"replica gave its join up ({self.abandoned}); it joins again", gave_up=True)
        if fwd.primary != self.primary:
            raise Unreplicated(f"replica is copying its rows from replica {self.primary}, not {fwd.primary}; "
                               "retry once it has joined", syncing=True)
        size = ids.nbytes + grads.nbytes
        if self.nbytes + size > self.budget:
            self.abandon(f"more than {self.budget} B of pushes arrived while it copied the rows")
            raise NotServing(f"replica gave its join up ({self.abandoned}); it joins again", gave_up=True)
        shard.local_rows(ids)  # ids outside the shard: refused now, not after the copy
        self.items.append((fwd.seq, fwd.push.request_id, ids.copy(), grads.copy(), push_lr(fwd.push)))
        self.nbytes += size
        return int(np.unique(ids).size)


class SingleCopy:
    """Pushes to a shard's only copy: each applied once per request id (see :class:`PushLog`);
    what :meth:`Replication.push` is for a replicated shard."""

    def __init__(self, shard: TableShard, pushlog: PushLog):
        self.shard, self.log = shard, pushlog
        self._lock = threading.Lock()  # a retry waits for the first attempt, then is answered

    def push(self, request: pb.ApplyGradientsRequest, ids: np.ndarray, grads: np.ndarray) -> int:
        with self._lock:
            done = self.log.get(request.request_id)
            if done is not None:
                return done.rows
            n = self.shard.apply_gradients(ids, grads, push_lr(request))
            self.log.record(request.request_id, n)
            return n


class Replication:
    """Replica ``index`` of ``shard``, whose copies serve at ``peers``; ``pushlog`` is the
    copy's memory of applied push ids."""

    def __init__(self, index: int, peers: list[str], shard: TableShard, pushlog: PushLog | None = None, *,
                 peer_token: str | None = None, tls_ca: bytes | None = None, timeout: float = 5.0,
                 join_timeout_s: float = 3600.0):
        if not 0 <= index < len(peers):
            raise ValueError(f"replica index {index} outside {len(peers)} peers")
        self.index, self.peers, self.shard = int(index), list(peers), shard
        self.log = pushlog if pushlog is not None else PushLog()
        self.primary = 0
        #: Replicas a primary forwards pushes to (all the others, until one is found dead).
        self.in_sync: set[int] = set(range(len(self.peers))) - {self.index}
        self.timeout, self.join_timeout_s = float(timeout), float(join_timeout_s)
        #: Serialises pushes (and the copy a join starts from): the one order every replica sees.
        self.order = threading.Lock()
        #: Sequence number of the last push applied here (numbered by the primary).
        self.seq = 0
        #: Joiner side: pushes kept while this copy copies the primary (None: not joining).
        self.buffer: JoinBuffer | None = None
        self._joins: dict[int, Join] = {}  # primary side: copies joining now, by replica index
        self.metadata = wire.auth_metadata(peer_token)
        self._creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
        self._channels: dict[str, grpc.Channel] = {}

    @property
    def role(self) -> str:
        return "primary" if self.primary == self.index else "backup"

    @property
    def backups(self) -> list[str]:
        return [self.peers[r] for r in sorted(self.in_sync)]

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            # A pool of its own: gRPC shares connections between channels to one address, so a
            # new channel would inherit the reconnect backoff of the dead copy's connection.
            opts = [("grpc.use_local_subchannel_pool", 1)]
            self._channels[address] = (grpc.secure_channel(address, self._creds, options=opts)
                                       if self._creds is not None else grpc.insecure_channel(address, options=opts))
        return self._channels[address]

    def reset_channel(self, address: str) -> None:
        """Forget the channel to ``address``: one to a copy that died may sit in gRPC's
        reconnect backoff and fail at once when the copy is back at the same address."""
        old = self._channels.pop(address, None)
        if old is not None:
            old.close()

    def describe(self, address: str, timeout: float) -> pb.DescribeResponse:
        return pb_grpc.EngramMemoryStub(self.channel(address)).Describe(
            pb.DescribeRequest(), timeout=timeout, metadata=self.metadata)

    # Pushes -------------------------------------------------------------------------------
    def push(self, request: pb.ApplyGradientsRequest, ids: np.ndarray, grads: np.ndarray) -> int:
        """A client's push: applied here and on every copy in sync, or refused (the caller
        retries with the same request id)."""
        if self.primary != self.index:
            if self.primary_alive():
                raise NotPrimary(f"replica {self.index} is a backup; send pushes to the primary, "
                                 f"primary={self.primary} at {self.peers[self.primary]}", primary=self.primary)
            self.promote()
        rid = request.request_id
        with self.order:
            done = self.log.get(rid)
            if done is not None and done.complete:
                return done.rows  # a retry of a push every replica already has
            if done is not None:
                n, seq = done.rows, done.seq  # applied here before; forward it again
            else:
                n = self.shard.apply_gradients(ids, grads, push_lr(request))
                self.seq += 1
                seq = self.seq
                self.log.record(rid, n, complete=False, seq=seq)
            failed = self.forward(pb.ForwardRequest(push=request, primary=self.index, seq=seq))
            if failed:  # not acknowledged: the client retries the same id, which re-forwards
                raise Unreplicated(f"push applied on the primary but not on every replica ({failed}); "
                                   "retry: it is applied once everywhere")
            self.log.record(rid, n, complete=True, seq=seq)
            return n

    def forwarded(self, fwd: pb.ForwardRequest, ids: np.ndarray, grads: np.ndarray) -> int:
        """A push the primary forwarded (from a peer): applied in the primary's order, or kept
        for after the copy while this copy joins."""
        if not 0 <= fwd.primary < len(self.peers) or fwd.primary == self.index or fwd.seq < 1:
            raise InvalidRequest(f"forward from replica {fwd.primary} with seq {fwd.seq}: expected another "
                                 f"of the {len(self.peers)} replicas and a positive seq")
        with self.order:
            if self.buffer is not None:
                return self.buffer.keep(fwd, ids, grads, self.shard)
            if self.primary == self.index:
                # Two copies order pushes: applying the other's would interleave two orders.
                # Refused, so its pushes fail loudly instead of the copies silently diverging.
                log.error("replica %d: a forward from replica %d, but this copy is the primary", self.index,
                          fwd.primary)
                raise NotPrimary(f"replica {self.index} is a primary itself and takes no forwards from "
                                 f"replica {fwd.primary}: two primaries; an operator must restart one")
            self.primary = fwd.primary  # follow whoever orders the pushes now
            return self._apply_forwarded(fwd.seq, fwd.push.request_id, ids, grads, push_lr(fwd.push))

    def _apply_forwarded(self, seq: int, rid: str, ids: np.ndarray, grads: np.ndarray, lr: float | None) -> int:
        done = self.log.get(rid)
        n = done.rows if done is not None else self.shard.apply_gradients(ids, grads, lr)
        self.seq = max(self.seq, seq)
        self.log.record(rid, n, complete=True, seq=seq)
        return n

    def forward(self, fwd: pb.ForwardRequest) -> str | None:
        """Send a push to every backup in sync (call under ``order``); None if each applied
        (or kept) it, or was found dead and dropped; else what failed."""
        for r in sorted(self.in_sync):
            address = self.peers[r]
            try:
                pb_grpc.EngramPeerStub(self.channel(address)).Forward(fwd, timeout=self.timeout,
                                                                      metadata=self.metadata)
            except grpc.RpcError as e:
                details = e.details() or ""
                syncing = wire.signal_of(e).name == wire.SYNCING
                if e.code() != grpc.StatusCode.UNAVAILABLE or syncing:  # alive: the push fails
                    return f"replica {r} at {address}: {e.code().name}: {details}"
                log.warning("replica %d: backup %d at %s is gone (%s); dropped until it rejoins",
                            self.index, r, address, details)
                self.in_sync.discard(r)
                self._joins.pop(r, None)  # a stream to it, if any, ends at its next chunk
        return None

    # Roles -------------------------------------------------------------------------------
    def primary_alive(self) -> bool:
        """Is the primary alive? Dead means its connection fails (UNAVAILABLE), or it answers
        as something other than a primary (a copy restarting at its address). A busy or slow
        primary is alive: a copy that took over from a live primary would order pushes of its
        own, and the copies would diverge."""
        try:
            return self.describe(self.peers[self.primary], 2.0).role == "primary"
        except grpc.RpcError as e:
            return e.code() != grpc.StatusCode.UNAVAILABLE

    def promote(self) -> None:
        log.warning("replica %d: primary %d at %s is unreachable; taking over as primary",
                    self.index, self.primary, self.peers[self.primary])
        self.primary = self.index
        self.in_sync = set(range(len(self.peers))) - {self.index}  # forwards prune the dead

    # Joins, primary side --------------------------------------------------------------------
    def begin_join(self, index: int, address: str) -> tuple[Join, dict[str, np.ndarray], list, int]:
        """Register copy ``index`` at ``address`` as joining: ``(join, arrays, applied ids,
        seq)``, a consistent copy to stream; every push from now on is forwarded to it."""
        with self.order:
            arrays, applied, seq = self.shard.snapshot(), self.log.items(), self.seq
            join = Join(index, time.monotonic())
            self._joins[index] = join  # supersedes an earlier attempt of the same copy
            self.peers[index] = address
            self.in_sync.add(index)
            self.reset_channel(address)  # the joiner gets a fresh channel
        return join, arrays, applied, seq

    def _expired(self, join: Join) -> bool:
        return time.monotonic() - join.started > self.join_timeout_s

    def join_alive(self, join: Join) -> bool:
        """Should the stream of ``join`` go on (not superseded, given up, or past its deadline)?"""
        with self.order:
            return self._joins.get(join.index) is join and not self._expired(join)

    def finish_join(self, join: Join) -> bool:
        """Before the last chunk: the joiner is a full member unless it was given up."""
        with self.order:
            if self._joins.get(join.index) is not join:
                return False
            del self._joins[join.index]  # a full member from now on
            return True

    def abandon_join(self, join: Join) -> None:
        """The stream ended before its last chunk: stop forwarding to that copy."""
        with self.order:
            if self._joins.get(join.index) is join:
                del self._joins[join.index]
                self.in_sync.discard(join.index)

    # Joins, joiner side ---------------------------------------------------------------------
    def start_buffer(self, primary: int) -> None:
        """Keep the pushes forwarded from ``primary`` from now on, to apply after the copy."""
        with self.order:
            self.buffer = JoinBuffer(primary)

    def abandon_buffer(self, why: str) -> None:
        """Give this copy's join up: forwards are answered as by a dead copy (so the primary
        drops it), and the copy it was fetching is never installed."""
        with self.order:
            if self.buffer is not None:
                self.buffer.abandon(why)

    def install(self, arrays: dict[str, np.ndarray], applied: list[tuple[str, int]], seq: int,
                primary: int) -> int:
        """Take the primary's copy, then the pushes kept meanwhile that it does not hold (those
        from ``primary`` numbered above ``seq``), in order; returns how many were applied."""
        with self.order:
            if self.buffer is None or self.buffer.abandoned:
                why = self.buffer.abandoned if self.buffer is not None else "no join in progress"
                raise EngramError(f"replica {self.index}: the join was given up meanwhile ({why}); join again")
            self.shard.restore(arrays)
            self.log.seed(applied)
            self.primary, self.seq = primary, seq
            kept = sorted(self.buffer.items if self.buffer.primary == primary else [], key=lambda t: t[0])
            self.buffer = None
            n = 0
            for s, rid, ids, grads, lr in kept:
                if s > self.seq:
                    self._apply_forwarded(s, rid, ids, grads, lr)
                    n += 1
            return n

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
