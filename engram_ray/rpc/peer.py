"""``PeerServicer``: the calls between the copies of a shard (``engram.v1.EngramPeer``), and
:func:`fetch_snapshot`, the joiner's side of a Snapshot.

Only callers with the peer token reach these (:class:`~.auth.CallGate`). What they may do is
still checked: a forward names a real replica and a positive sequence number; a Snapshot comes
for a real replica index, and the primary calls ``join_address`` back before it streams
anything there. The joiner, in turn, trusts no chunk: each names a known part, fits the
message limit, and together they must tile exactly the rows and state it expects.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grpc
import numpy as np

from ..errors import EngramError, InvalidRequest, NotPrimary, NotServing, Unreplicated
from . import codec
from .generated import engram_pb2 as pb
from .generated import engram_pb2_grpc as pb_grpc
from .pushlog import check_request_id
from .replication import Replication
from .servicer import REFUSING, SERVING, SYNCING_STATE, ShardServicer
from .wire import DEFAULT_MAX_MESSAGE_BYTES, auth_metadata

__all__ = ["PeerServicer", "fetch_snapshot", "join_copy", "Snapshot"]


class PeerServicer(pb_grpc.EngramPeerServicer):
    """EngramPeer for the copy served by ``memory``."""

    def __init__(self, memory: ShardServicer):
        self.memory = memory

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ApplyGradientsResponse:
        m = self.memory
        try:
            ids, grads = m.decode_push(request.push)
            if m.state == REFUSING:
                raise NotServing(m.refusal)
            repl = m.replication
            if repl is None:
                if m.state == SYNCING_STATE:
                    raise Unreplicated("replica is copying its rows; retry once it has joined", syncing=True)
                raise NotPrimary(f"shard {m.shard.shard_index} here has no other copies; nothing to forward to it")
            n = repl.forwarded(request, ids, grads)
        except Exception as e:  # noqa: BLE001 - every error becomes a status code
            m.abort(context, e)
        return pb.ApplyGradientsResponse(rows_updated=n, update_count=m.shard.rows_version)

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> Iterator[pb.SnapshotChunk]:
        """Stream a consistent copy to a joining copy, without holding pushes up."""
        try:
            repl = self._primary_for(request)
        except Exception as e:  # noqa: BLE001
            self.memory.abort(context, e)
        join, arrays, applied, seq = repl.begin_join(request.join_index, request.join_address)
        finished = False
        try:
            for chunk in self._chunks(arrays, applied, repl.index):
                if not repl.join_alive(join):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"Snapshot for replica {join.index}: given up (superseded, or past "
                                  f"join_timeout_s={repl.join_timeout_s:.0f}); join again")
                yield chunk
            if not repl.finish_join(join):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"Snapshot for replica {join.index}: given up")
            finished = True
            yield pb.SnapshotChunk(part="end", primary=repl.index, seq=seq)
        finally:
            if not finished:
                repl.abandon_join(join)

    def _primary_for(self, request: pb.SnapshotRequest) -> Replication:
        """This copy's replication, if it is the serving primary a join may copy (a backup
        whose primary is the very copy that joins takes over first)."""
        m, repl = self.memory, self.memory.replication
        m._check_fingerprint(request.fingerprint)
        if repl is None:
            raise NotPrimary(f"Snapshot: shard {m.shard.shard_index} here has no other copies")
        if not 0 <= request.join_index < len(repl.peers) or request.join_index == repl.index:
            raise InvalidRequest(f"Snapshot: join_index {request.join_index}; expected another of the "
                                 f"{len(repl.peers)} replicas")
        if repl.role != "primary" and request.join_index == repl.primary and m.serving:
            repl.promote()  # the primary itself died and rejoins: this copy takes over
        if repl.role != "primary" or not m.serving:
            raise NotPrimary(f"Snapshot: shard {m.shard.shard_index} here is not a serving primary")
        self._check_joiner(request, repl)
        return repl

    def _check_joiner(self, request: pb.SnapshotRequest, repl: Replication) -> None:
        """The copy that joins must answer at ``join_address`` as itself, copying its rows:
        nobody may point the primary's forwards at an address of their choosing."""
        m = self.memory
        address = request.join_address
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"Snapshot: join_address {address!r}; expected host:port")
        repl.reset_channel(address)  # it may be back at the address of a copy that died
        try:
            info = repl.describe(address, timeout=2.0)
        except grpc.RpcError as e:
            raise InvalidRequest(f"Snapshot: the joining copy does not answer at {address!r} "
                                 f"({e.code().name}); refused") from None
        want = (m.shard.fingerprint, m.shard.shard_index, request.join_index, SYNCING_STATE)
        got = (info.fingerprint, info.shard_index, info.replica, info.state)
        if got != want:
            raise InvalidRequest(f"Snapshot: {address} answers as {got} (fingerprint, shard, replica, state), "
                                 f"not as the joining copy {want}; refused")

    def _chunks(self, arrays: dict[str, np.ndarray], applied: list[tuple[str, int]],
                primary: int) -> Iterator[pb.SnapshotChunk]:
        """Every array in pieces of at most half the message limit, then the push ids likewise."""
        budget = max(1, self.memory.max_message_bytes // 2)
        for part, arr in arrays.items():
            dtype = self.memory.shard.store.dtype if part == "rows" else None
            step = max(1, budget // max(1, arr[:1].nbytes))
            for a in range(0, max(1, arr.shape[0]), step):
                yield pb.SnapshotChunk(part=part, row_offset=a, primary=primary,
                                       data=codec.encode(arr[a:a + step], dtype))
        ids: list[str] = []
        rows: list[int] = []
        size = 0
        for rid, n in applied:
            cost = len(rid) + 24  # the id, its length and tag, and its row count
            if ids and size + cost > budget:
                yield pb.SnapshotChunk(part="applied", primary=primary, applied_ids=ids, applied_rows=rows)
                ids, rows, size = [], [], 0
            ids.append(rid)
            rows.append(n)
            size += cost
        if ids:
            yield pb.SnapshotChunk(part="applied", primary=primary, applied_ids=ids, applied_rows=rows)


class Snapshot(dict):
    """What :func:`fetch_snapshot` got: the arrays by part, plus ``applied`` (request id,
    rows) pairs, ``seq`` and ``primary``."""

    applied: list[tuple[str, int]]
    seq: int
    primary: int
    #: Pushes kept while copying and applied after the copy (set by :func:`join_copy`).
    kept: int = 0


def fetch_snapshot(address: str, fingerprint: str, join_index: int, join_address: str, *,
                   expect: dict[str, tuple[str, tuple[int, ...]]], peer_token: str | None = None,
                   tls_ca: bytes | None = None, timeout: float = 3600.0,
                   max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Snapshot:
    """Copy a primary's rows and optimiser state for a joining copy. ``expect``: part ->
    (dtype, shape) of each array the copy holds ("rows" always): the chunks must tile exactly
    these, or :class:`EngramError` says what the primary sent instead."""
    opts = [("grpc.max_receive_message_length", max_message_bytes)]
    creds = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls_ca else None
    channel = (grpc.secure_channel(address, creds, options=opts) if creds is not None
               else grpc.insecure_channel(address, options=opts))
    pieces: dict[str, list[tuple[int, np.ndarray]]] = collections.defaultdict(list)
    out = Snapshot()
    out.applied, out.seq, out.primary = [], -1, -1
    src = f"snapshot from {address}"
    try:
        stream = pb_grpc.EngramPeerStub(channel).Snapshot(
            pb.SnapshotRequest(fingerprint=fingerprint, join_address=join_address, join_index=join_index),
            timeout=timeout, metadata=auth_metadata(peer_token))
        for chunk in stream:
            _take_chunk(src, chunk, expect, out, pieces)
    except InvalidRequest as e:
        raise EngramError(f"{src}: {e}") from None
    finally:
        channel.close()
    if out.seq < 0:
        raise EngramError(f"{src}: the stream ended without its end chunk (incomplete)")
    if set(pieces) != set(expect):
        raise EngramError(f"{src}: parts {sorted(pieces)}; expected {sorted(expect)}")
    for part, got in pieces.items():
        out[part] = _tile(f"{src}: {part}", got, expect[part][1][0])
    return out


def _take_chunk(src: str, chunk: pb.SnapshotChunk, expect: dict[str, tuple[str, tuple[int, ...]]], out: Snapshot,
                pieces: dict[str, list[tuple[int, np.ndarray]]]) -> None:
    """One chunk of a snapshot stream, checked, into ``out`` (end, applied ids) or ``pieces``."""
    if out.seq >= 0:
        raise EngramError(f"{src}: a {chunk.part!r} chunk after the end")
    if out.primary not in (-1, chunk.primary):
        raise EngramError(f"{src}: chunks from replicas {out.primary} and {chunk.primary}")
    out.primary = chunk.primary
    if chunk.part == "end":
        out.seq = chunk.seq
    elif chunk.part == "applied":
        if len(chunk.applied_ids) != len(chunk.applied_rows) or min(chunk.applied_rows, default=0) < 0:
            raise EngramError(f"{src}: applied ids and row counts do not match")
        for rid in chunk.applied_ids:
            check_request_id(rid)
        out.applied.extend(zip(chunk.applied_ids, chunk.applied_rows))
    elif chunk.part in expect:
        dtype, shape = expect[chunk.part]
        arr = codec.decode(chunk.data, what=f"{src}: {chunk.part}", dtypes=(dtype,), ndim=len(shape))
        if arr.shape[1:] != shape[1:] or not 0 <= chunk.row_offset <= shape[0] - arr.shape[0]:
            raise EngramError(f"{src}: {chunk.part} piece {arr.shape} at row {chunk.row_offset} does not "
                              f"fit {shape}")
        pieces[chunk.part].append((chunk.row_offset, arr))
    else:
        raise EngramError(f"{src}: unexpected part {chunk.part!r}; this copy holds {sorted(expect)}")


def _tile(what: str, got: list[tuple[int, np.ndarray]], rows: int) -> np.ndarray:
    """The pieces ``(row offset, array)`` of one part as one array of ``rows`` rows; they must
    tile it exactly (no gap, no overlap)."""
    got.sort(key=lambda t: t[0])
    at = 0
    for offset, arr in got:
        if offset != at:
            raise EngramError(f"{what} pieces leave a gap or overlap at row {at} (next at {offset})")
        at += arr.shape[0]
    if at != rows:
        raise EngramError(f"{what} covers {at} rows; expected {rows}")
    return np.concatenate([a for _, a in got]) if len(got) > 1 else got[0][1].copy()


def join_copy(servicer: ShardServicer, replica: int, peers: list[str], source: int, *,
              peer_token: str | None = None, tls_ca: bytes | None = None, timeout: float = 3600.0,
              join_timeout_s: float = 3600.0, forward_timeout: float = 5.0) -> Snapshot:
    """Make the copy served by ``servicer`` (replica ``replica`` at ``peers[replica]``, in
    state "syncing") a member again by copying replica ``source``: it keeps the pushes
    forwarded meanwhile, installs the copy, applies the kept pushes the copy lacks, and serves.
    Raises (the copy stays "syncing") when the copy cannot be had; call it again."""
    shard = servicer.shard
    expect = {"rows": (shard.store.dtype, shard.values.shape),
              **{k: (v.dtype.name, v.shape) for k, v in shard.optimizer.state().items()}}
    repl = Replication(replica, peers, shard, servicer.pushlog, peer_token=peer_token, tls_ca=tls_ca,
                       timeout=forward_timeout, join_timeout_s=join_timeout_s)
    repl.start_buffer(source)
    servicer.replication = repl
    try:
        snap = fetch_snapshot(peers[source], shard.fingerprint, replica, peers[replica], expect=expect,
                              peer_token=peer_token, tls_ca=tls_ca, timeout=timeout,
                              max_message_bytes=servicer.max_message_bytes)
        if snap.primary != source:
            raise EngramError(f"snapshot from {peers[source]} says it comes from replica {snap.primary}, "
                              f"not {source}")
    except BaseException as e:
        # Decided here, once: this copy is out (forwards get "gone", so the primary drops it).
        repl.abandon_buffer(f"{type(e).__name__}: {e}"[:300])
        raise
    snap.kept = repl.install(snap, snap.applied, snap.seq, snap.primary)
    servicer.rows_from = f"replica {snap.primary} at {peers[source]}"
    servicer.state, servicer.refusal = SERVING, ""
    return snap
