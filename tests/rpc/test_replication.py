"""Primary-backup replication on real gRPC servers (loopback): every acknowledged push is on
every replica in the same order; reads fail over at once; a retried push applies once; a
backup takes over from a dead primary; a replica rejoins by copying the primary, while pushes
go on, with any message limit and any number of remembered pushes; only peers can forward or
snapshot, and only to the copy that joins."""

import threading
import time

import grpc
import numpy as np
import pytest

from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.errors import ShardUnavailable
from engram_ray.rpc import codec, create_server
from engram_ray.rpc.generated import engram_pb2 as pb
from engram_ray.rpc.generated import engram_pb2_grpc as pb_grpc
from engram_ray.rpc.peer import join_copy
from engram_ray.rpc.replication import Replication
from engram_ray.rpc.servicer import SYNCING_STATE, ShardServicer
from engram_ray.store import TableShard

STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.05))
TOKEN, PEER = "client-token-0123", "peer-token-4567"
CLIENT_MD = (("authorization", f"Bearer {TOKEN}"),)
PEER_MD = (("authorization", f"Bearer {PEER}"),)


class Replicated:
    """``R`` copies of one whole-table shard, each on its own server, with the service's
    client token and the copies' peer token."""

    def __init__(self, layout, copies=2, max_message_bytes=64 << 20, **server_kw):
        self.layout, self.mmb, self.server_kw = layout, max_message_bytes, server_kw
        self.shards = [TableShard.create(layout, 1, 0, STORE) for _ in range(copies)]
        self.servicers = [ShardServicer(s, max_message_bytes) for s in self.shards]
        self.servers = [self._serve(s, v) for s, v in zip(self.shards, self.servicers)]
        self.addresses = [f"127.0.0.1:{p}" for _, p in self.servers]
        for r, v in enumerate(self.servicers):
            v.replication = Replication(r, self.addresses, v.shard, v.pushlog, peer_token=PEER, timeout=2)

    def _serve(self, shard, servicer, port=0):
        return create_server(shard, "127.0.0.1", port, servicer=servicer, token=TOKEN, peer_token=PEER,
                             max_message_bytes=self.mmb, **self.server_kw)

    def stop(self, r):
        self.servers[r][0].stop(0)

    def restart(self, r, same_address=False):
        """Replica ``r`` dies and comes back with nothing, syncing: (shard, servicer, address)."""
        self.stop(r)
        fresh = TableShard.create(self.layout, 1, 0, STORE)
        servicer = ShardServicer(fresh, self.mmb)
        servicer.state = SYNCING_STATE
        port = int(self.addresses[r].rsplit(":", 1)[1]) if same_address else 0
        self.servers[r] = self._serve(fresh, servicer, port)
        self.shards[r], self.servicers[r] = fresh, servicer
        self.addresses[r] = f"127.0.0.1:{self.servers[r][1]}"
        return fresh, servicer, self.addresses[r]

    def join(self, r, source=0, **kw):
        return join_copy(self.servicers[r], r, list(self.addresses), source, peer_token=PEER, **kw)

    def client(self, **kw):
        return EngramClient([self.addresses], self.layout, token=TOKEN, **kw)

    def close(self):
        for srv, _ in self.servers:
            srv.stop(0)


@pytest.fixture
def pair(tiny_layout):
    c = Replicated(tiny_layout)
    yield c
    c.close()


def _push(client, layout, seed, n=30):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, layout.total_rows, size=(4, n))
    g = rng.normal(size=ids.shape + (16,)).astype(np.float32)
    return ids, g, client.push_gradients(ids, g)


def _signal(err):
    """The engram-* trailing metadata of a refusal, as a dict."""
    return {k: v for k, v in err.trailing_metadata() or () if k.startswith("engram-")}


def _raw_push(address, fp, rid, ids=(3, 4), extra=b"", metadata=CLIENT_MD):
    """An ApplyGradients sent as raw bytes (``extra`` appended: fields the proto no longer has)."""
    req = pb.ApplyGradientsRequest(fingerprint=fp, row_ids=codec.encode(np.array(ids)),
                                   grads=codec.encode(np.ones((len(ids), 16), np.float32)), request_id=rid)
    call = grpc.insecure_channel(address).unary_unary("/engram.v1.EngramMemory/ApplyGradients")
    return pb.ApplyGradientsResponse.FromString(call(req.SerializeToString() + extra, timeout=5, metadata=metadata))


def test_every_acknowledged_push_is_on_every_replica(pair, tiny_layout):
    replay = TableShard.create(tiny_layout, 1, 0, STORE)
    with pair.client() as client:
        for seed in range(5):
            ids, g, _ = _push(client, tiny_layout, seed)
            replay.apply_gradients(ids.reshape(-1), g.reshape(-1, 16))
        d = client.describe()[0]
    assert pair.shards[0].checksum() == pair.shards[1].checksum() == replay.checksum()
    assert d["role"] == "primary" and d["backups"] == [pair.addresses[1]] and d["state"] == "serving"


def test_a_pushs_learning_rate_reaches_every_replica(pair, tiny_layout):
    replay = TableShard.create(tiny_layout, 1, 0, STORE)
    with pair.client() as client:
        ids = np.array([5, 17, 5])
        g = np.ones((3, 16), np.float32)
        client.push_gradients(ids, g, lr=0.3)
        replay.apply_gradients(ids, g, lr=0.3)
    assert pair.shards[0].checksum() == pair.shards[1].checksum() == replay.checksum()
    default = TableShard.create(tiny_layout, 1, 0, STORE)
    default.apply_gradients(ids, g)                   # at the deployed 0.05: other rows
    assert default.checksum() != replay.checksum()


def test_a_retried_push_is_applied_once_everywhere(pair, tiny_layout):
    fp = pair.shards[0].fingerprint
    _raw_push(pair.addresses[0], fp, "c-1")
    once = pair.shards[0].checksum()
    _raw_push(pair.addresses[0], fp, "c-1")  # the same id again: a retry
    assert pair.shards[0].checksum() == once == pair.shards[1].checksum()
    assert pair.shards[0].counters["updates"] == pair.shards[1].counters["updates"] == 1


def test_reads_fail_over_at_once_and_a_backup_takes_over_pushes(pair, tiny_layout):
    with pair.client(timeout=2, retries=1) as client:
        ids = np.arange(tiny_layout.total_rows)
        want = client.lookup(ids)
        pair.stop(0)  # the primary dies
        for _ in range(20):  # a stream of lookups: none fails
            assert np.array_equal(client.lookup(ids), want)
        assert client.stats()["failovers"] >= 1
        _push(client, tiny_layout, 7)  # replica 1 finds the primary dead and takes over
        assert pair.servicers[1].replication.role == "primary"
        assert not np.array_equal(client.lookup(ids), want)


def test_a_dead_backup_is_dropped_and_pushes_go_on(pair, tiny_layout):
    pair.stop(1)
    with pair.client(timeout=2, retries=1, backoff=0.01) as client:
        _push(client, tiny_layout, 1)
        assert pair.servicers[0].replication.in_sync == set()
        assert client.describe()[0]["backups"] == []


def test_a_slow_backup_fails_the_push_until_it_catches_up(pair, tiny_layout):
    gate = threading.Event()
    apply = pair.shards[1].apply_gradients
    pair.shards[1].apply_gradients = lambda ids, g, lr=None: (gate.wait(10), apply(ids, g, lr))[1]
    pair.servicers[0].replication.timeout = 0.3
    with pair.client(timeout=5, retries=0) as client:
        with pytest.raises(ShardUnavailable, match="not on every replica"):
            _push(client, tiny_layout, 1)  # applied on the primary, not acknowledged
        gate.set()
        _push(client, tiny_layout, 2)
    assert pair.servicers[0].replication.in_sync == {1}  # slow is not dead
    assert pair.shards[0].counters["updates"] == 2


def test_a_replica_rejoins_by_copying_the_primary(pair, tiny_layout):
    with pair.client() as client:
        _push(client, tiny_layout, 1)
        fresh, servicer, _ = pair.restart(1)  # a backup dies and comes back with nothing
        with pytest.raises(ShardUnavailable):  # it serves nothing until it has the rows
            EngramClient([[pair.addresses[1]]], tiny_layout, token=TOKEN, retries=0).lookup(np.arange(3))
        with pytest.raises(grpc.RpcError) as e:  # a copy copying its rows says so: "go elsewhere"
            pb_grpc.EngramMemoryStub(grpc.insecure_channel(pair.addresses[1])).Lookup(
                pb.LookupRequest(fingerprint=fresh.fingerprint, row_ids=codec.encode(np.arange(3))), timeout=5,
                metadata=CLIENT_MD)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and _signal(e.value) == {"engram-signal": "syncing"}
        snap = pair.join(1)
        assert snap.primary == 0 and set(snap) == {"rows", "adam_m", "adam_v", "adam_steps"}
        assert servicer.state == "serving" and fresh.checksum() == pair.shards[0].checksum()
        _push(client, tiny_layout, 2)  # forwarded to the new copy now
        assert fresh.checksum() == pair.shards[0].checksum()
        assert np.array_equal(fresh.optimizer.steps, pair.shards[0].optimizer.steps)


def test_a_restarted_primary_copies_its_follower_which_takes_over(pair, tiny_layout):
    with pair.client() as client:
        _push(client, tiny_layout, 1)
    fresh, servicer, me = pair.restart(0)  # the primary dies before any push reached its backup alone
    snap = pair.join(0, source=1)
    assert snap.primary == 1 and pair.servicers[1].replication.role == "primary"  # the follower took over
    assert servicer.replication.role == "backup"
    with EngramClient([[me, pair.addresses[1]]], tiny_layout, token=TOKEN) as client:
        _push(client, tiny_layout, 2)  # to replica 0 first: a backup now, it names the primary
        assert client.stats()["redirects"] == 1
    assert fresh.checksum() == pair.shards[1].checksum()


def test_a_push_in_the_copied_rows_is_not_applied_again_when_it_is_retried(pair, tiny_layout):
    """The primary applied a push but could not forward it (the copy had not joined yet, and
    refused it); the joiner's copy already holds it, so the retry must not apply it again."""
    fresh, servicer, me = pair.restart(1, same_address=True)  # the primary still counts it in sync
    with pytest.raises(grpc.RpcError) as e:
        _raw_push(pair.addresses[0], fresh.fingerprint, "c-7", ids=(5, 9))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "not on every replica" in e.value.details()
    assert _signal(e.value) == {"engram-signal": "unreplicated"}
    snap = pair.join(1)
    assert ("c-7", 2) in snap.applied
    assert _raw_push(pair.addresses[0], fresh.fingerprint, "c-7", ids=(5, 9)).rows_updated == 2  # the retry
    assert fresh.checksum() == pair.shards[0].checksum()  # applied once on each copy
    assert fresh.counters["updates"] == 0 and pair.shards[0].counters["updates"] == 1


def test_a_copy_back_at_its_old_address_gets_every_later_push(pair, tiny_layout):
    """The primary's channel to a dead copy sits in gRPC's reconnect backoff; when the copy
    rejoins at the same address it must be forwarded to, not dropped again."""
    with pair.client(timeout=2) as client:
        pair.stop(1)
        _push(client, tiny_layout, 1)  # the dead copy is dropped; the channel backs off
        assert pair.servicers[0].replication.in_sync == set()
        fresh, _, _ = pair.restart(1, same_address=True)
        pair.join(1)
        for seed in (2, 3):
            _push(client, tiny_layout, seed)
        assert pair.servicers[0].replication.in_sync == {1}
    assert fresh.checksum() == pair.shards[0].checksum() and fresh.counters["updates"] == 2


# Issue 11 #6: a join never holds pushes up --------------------------------------------------
def test_pushes_made_while_a_copy_streams_its_snapshot_reach_it_in_order(tiny_layout):
    """Pushes go on during the copy (forwarded to the joiner, which keeps them and applies
    those the copy lacks after it): at the end all copies are equal, and no push failed."""
    trio = Replicated(tiny_layout, copies=3, max_message_bytes=1 << 16)  # ~17 chunks of rows
    try:
        with trio.client(timeout=5) as client:
            _push(client, tiny_layout, 0)
            trio.restart(2)
            stop, errors, pushed = threading.Event(), [], [0]

            def keep_pushing():
                seed = 100
                while not stop.is_set():
                    try:
                        _push(client, tiny_layout, seed, n=5)
                        pushed[0] += 1
                    except Exception as e:  # noqa: BLE001
                        errors.append(e)
                    seed += 1

            t = threading.Thread(target=keep_pushing)
            t.start()
            time.sleep(0.2)
            snap = trio.join(2)
            time.sleep(0.2)
            stop.set()
            t.join()
        assert not errors and pushed[0] > 5
        assert snap.kept >= 1, "no push landed during the copy: the test did not test the overlap"
        assert trio.shards[0].checksum() == trio.shards[1].checksum() == trio.shards[2].checksum()
        assert np.array_equal(trio.shards[2].optimizer.steps, trio.shards[0].optimizer.steps)
    finally:
        trio.close()


def _open_join(pair, r):
    """Replica ``r`` restarts and asks for a snapshot, which it then never reads."""
    fresh, servicer, me = pair.restart(r)
    repl = Replication(r, list(pair.addresses), fresh, servicer.pushlog, peer_token=PEER, timeout=2)
    repl.start_buffer(0)
    servicer.replication = repl
    ch = grpc.insecure_channel(pair.addresses[0], options=[("grpc.max_receive_message_length", 64 << 20)])
    stream = pb_grpc.EngramPeerStub(ch).Snapshot(
        pb.SnapshotRequest(fingerprint=fresh.fingerprint, join_address=me, join_index=r), timeout=60,
        metadata=PEER_MD)
    next(stream)  # the stream has begun: the primary copied its state and counts the joiner in
    return stream, repl


def test_an_unread_snapshot_stream_holds_up_no_push_describe_or_health(tiny_layout):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    pair = Replicated(tiny_layout, copies=2, max_message_bytes=1 << 16)
    try:
        streams = [_open_join(pair, 1)]  # a second, superseding join of the same copy too
        streams.append(_open_join(pair, 1))
        with pair.client(timeout=3, retries=0) as client:
            t0 = time.perf_counter()
            for seed in range(5):
                _push(client, tiny_layout, seed)  # forwarded to the (unread) joiner, kept there
            assert time.perf_counter() - t0 < 5
            assert client.describe()[0]["state"] == "serving"
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(pair.addresses[0]))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert len(streams[1][1].buffer.items) == 5
    finally:
        pair.close()


def test_a_joiner_that_stops_reading_gives_its_join_up_and_pushes_go_on(tiny_layout):
    """Its kept pushes outgrow its buffer: it gives the join up, answering forwards as a dead
    copy would; the primary drops it (pushes are acknowledged, none waits) and stops its
    stream; the copy would never install what it got, and joins again."""
    pair = Replicated(tiny_layout, copies=2, max_message_bytes=1 << 16)
    try:
        stream, repl = _open_join(pair, 1)
        repl.buffer.budget = 1  # it can keep nothing: the first forward outgrows it
        primary = pair.servicers[0].replication
        with pair.client(timeout=3, retries=0) as client:
            _push(client, tiny_layout, 1)
            assert primary.in_sync == set() and not primary._joins
            _push(client, tiny_layout, 2)
        assert "more than 1 B of pushes" in repl.buffer.abandoned
        push = pb.ApplyGradientsRequest(fingerprint=pair.shards[0].fingerprint, row_ids=codec.encode(np.array([3])),
                                        grads=codec.encode(np.ones((1, 16), np.float32)), request_id="f-1")
        with pytest.raises(grpc.RpcError) as e:  # what the primary saw: a copy that gave up, as if dead
            pb_grpc.EngramPeerStub(grpc.insecure_channel(pair.addresses[1])).Forward(
                pb.ForwardRequest(push=push, primary=0, seq=9), timeout=5, metadata=PEER_MD)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and _signal(e.value) == {"engram-signal": "gave-up"}
        with pytest.raises(Exception, match="given up meanwhile"):
            repl.install({}, [], 0, 0)
        assert pair.servicers[1].state == "syncing"
    finally:
        pair.close()


def test_a_stream_past_the_join_timeout_is_ended_and_its_copy_dropped(tiny_layout):
    pair = Replicated(tiny_layout, copies=2, max_message_bytes=1 << 16)
    try:
        primary = pair.servicers[0].replication
        primary.join_timeout_s = 1e-6  # every stream is past it by its first chunk
        fresh, _, _ = pair.restart(1)
        with pytest.raises(grpc.RpcError) as e:
            pair.join(1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "given up" in e.value.details()
        assert primary.in_sync == set() and not primary._joins
        with pair.client(timeout=3, retries=0) as client:
            _push(client, tiny_layout, 1)  # the joiner gave up too: forwards to it would be "gone"
        primary.join_timeout_s = 60
        pair.join(1)  # it joins again, and is in sync
        assert primary.in_sync == {1} and fresh.checksum() == pair.shards[0].checksum()
    finally:
        pair.close()


# Issue 11 #4: a rejoin with a small message limit and many remembered pushes ---------------
def test_a_copy_rejoins_with_the_smallest_message_limit_and_thousands_of_long_push_ids(tiny_layout):
    pair = Replicated(tiny_layout, copies=2, max_message_bytes=1 << 16)  # 64 KiB: the least allowed
    try:
        fp = pair.shards[0].fingerprint
        stub = pb_grpc.EngramMemoryStub(grpc.insecure_channel(pair.addresses[0]))
        g = codec.encode(np.ones((1, 16), np.float32))
        futures = [stub.ApplyGradients.future(
            pb.ApplyGradientsRequest(fingerprint=fp, row_ids=codec.encode(np.array([i % 8000])), grads=g,
                                     request_id=f"{i:06d}-" + "x" * 121), timeout=60, metadata=CLIENT_MD)
            for i in range(3000)]  # 3000 ids of 128 bytes: 384 KB of ids, 6x the message limit
        assert all(f.result().rows_updated == 1 for f in futures)
        fresh, _, _ = pair.restart(1)
        snap = pair.join(1)
        assert len(snap.applied) == 3000
        assert fresh.checksum() == pair.shards[0].checksum()
    finally:
        pair.close()


# Issue 11 #5: only peers act as peers -------------------------------------------------------
def test_a_client_token_cannot_call_the_peer_service(pair, tiny_layout):
    fp = pair.shards[0].fingerprint
    peer = pb_grpc.EngramPeerStub(grpc.insecure_channel(pair.addresses[1]))
    push = pb.ApplyGradientsRequest(fingerprint=fp, row_ids=codec.encode(np.array([3])),
                                    grads=codec.encode(np.ones((1, 16), np.float32)), request_id="evil-1")
    before = [s.checksum() for s in pair.shards]
    for md in (CLIENT_MD, (), (("authorization", "Bearer guess"),)):
        with pytest.raises(grpc.RpcError) as e:
            peer.Forward(pb.ForwardRequest(push=push, primary=0, seq=1), timeout=5, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "peer token" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.EngramPeerStub(grpc.insecure_channel(pair.addresses[0])).Snapshot(
                pb.SnapshotRequest(fingerprint=fp, join_address="127.0.0.1:1", join_index=1), timeout=5, metadata=md))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [s.checksum() for s in pair.shards] == before
    assert pair.servicers[0].replication.in_sync == {1} and pair.servicers[0].replication.peers == pair.addresses
    assert [v.replication.role for v in pair.servicers] == ["primary", "backup"]


def test_the_old_peer_fields_in_a_client_push_are_ignored(pair, tiny_layout):
    """forwarded=true, primary=1 (fields 5 and 6 of old) sent by a client: a push like any
    other, applied on every copy, and the backup still follows replica 0."""
    fp = pair.shards[0].fingerprint
    _raw_push(pair.addresses[0], fp, "c-1", extra=b"\x28\x01\x30\x01")  # to the primary
    assert pair.shards[0].checksum() == pair.shards[1].checksum() and pair.shards[1].counters["updates"] == 1
    with pytest.raises(grpc.RpcError) as e:  # to the backup: referred to the primary, not applied
        _raw_push(pair.addresses[1], fp, "c-2", extra=b"\x28\x01\x30\xe7\x07")  # primary=999
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "primary=0" in e.value.details()
    assert _signal(e.value) == {"engram-signal": "not-primary", "engram-primary": "0"}
    assert pair.shards[1].counters["updates"] == 1
    assert [v.replication.role for v in pair.servicers] == ["primary", "backup"]


def test_a_snapshot_must_come_from_the_copy_it_names(pair, tiny_layout):
    """Even with the peer token, a join names a syncing copy of this shard at its address: the
    primary calls it back, and never forwards to (or drops its backup for) anyone else."""
    fp = pair.shards[0].fingerprint
    other = TableShard.create(tiny_layout, 1, 0, STORE)
    impostor, port = create_server(other, "127.0.0.1", 0, token=TOKEN, peer_token=PEER)  # serving, not syncing
    snap = pb_grpc.EngramPeerStub(grpc.insecure_channel(pair.addresses[0])).Snapshot
    try:
        for address, index, match in [(f"127.0.0.1:{port}", 1, "not as the joining copy"),
                                      ("127.0.0.1:1", 1, "does not answer"),
                                      ("nonsense", 1, "expected host:port"),
                                      (pair.addresses[1], 1, "not as the joining copy"),  # the live backup
                                      (pair.addresses[1], 0, "join_index 0"),
                                      (pair.addresses[1], 7, "join_index 7")]:
            with pytest.raises(grpc.RpcError) as e:
                list(snap(pb.SnapshotRequest(fingerprint=fp, join_address=address, join_index=index),
                          timeout=10, metadata=PEER_MD))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details(), e.value.details()
        primary = pair.servicers[0].replication
        assert primary.peers == pair.addresses and primary.in_sync == {1}
        with pair.client() as client:
            _push(client, tiny_layout, 1)
        assert pair.shards[1].checksum() == pair.shards[0].checksum() and other.counters["updates"] == 0
    finally:
        impostor.stop(0)


# Found by attacking the hardened service (review): a client cannot make a live copy look dead
def _hold_slots(address, n):
    """``n`` authenticated calls whose body never arrives: every client slot of a shard taken."""
    never = threading.Event()

    def stalled():
        never.wait()
        yield b""
    ch = grpc.insecure_channel(address)
    calls = [ch.stream_unary("/engram.v1.EngramMemory/Lookup").future(stalled(), timeout=30, metadata=CLIENT_MD)
             for _ in range(n)]
    time.sleep(0.3)
    return never, ch, calls


def test_a_primary_whose_client_slots_are_all_taken_is_not_taken_over(tiny_layout):
    pair = Replicated(tiny_layout, copies=2, max_concurrent_rpcs=4, max_workers=4)
    never, ch, _ = _hold_slots(pair.addresses[0], 4)
    try:
        with pytest.raises(grpc.RpcError) as e:  # a push to the backup: referred to the live primary
            _raw_push(pair.addresses[1], pair.shards[0].fingerprint, "c-1")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "primary=0" in e.value.details()
        assert _signal(e.value) == {"engram-signal": "not-primary", "engram-primary": "0"}
        assert [v.replication.role for v in pair.servicers] == ["primary", "backup"]
        # and a copy that restarts joins through the busy primary all the same
        never2, ch2, _ = _hold_slots(pair.addresses[1], 0)
        fresh, _, _ = pair.restart(1)
        never3, ch3, _ = _hold_slots(pair.addresses[1], 4)  # the joiner's client slots too
        pair.join(1)
        assert fresh.checksum() == pair.shards[0].checksum()
        never3.set()
        ch3.close()
        ch2.close()
    finally:
        never.set()
        ch.close()
        pair.close()


def test_a_primary_takes_no_forward_from_another_primary(pair, tiny_layout):
    fp = pair.shards[0].fingerprint
    push = pb.ApplyGradientsRequest(fingerprint=fp, row_ids=codec.encode(np.array([3])),
                                    grads=codec.encode(np.ones((1, 16), np.float32)), request_id="p-1")
    before = pair.shards[0].checksum()
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.EngramPeerStub(grpc.insecure_channel(pair.addresses[0])).Forward(
            pb.ForwardRequest(push=push, primary=1, seq=5), timeout=5, metadata=PEER_MD)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "two primaries" in e.value.details()
    assert _signal(e.value) == {"engram-signal": "not-primary"}  # it knows of no other primary
    assert pair.shards[0].checksum() == before and pair.servicers[0].replication.role == "primary"


def test_a_push_that_could_not_be_forwarded_within_the_limit_is_refused_before_it_is_applied(tiny_layout):
    limit = 1 << 16
    pair = Replicated(tiny_layout, copies=2, max_message_bytes=limit)
    try:
        fp = pair.shards[0].fingerprint
        fits = [pb.ApplyGradientsRequest(fingerprint=fp, row_ids=codec.encode(np.arange(n)),
                                         grads=codec.encode(np.ones((n, 16), np.float32)), request_id="b" * k)
                for n in range(880, 920) for k in range(1, 129, 4)]
        # a push that fits the limit by itself, but not once wrapped for a backup
        req = max((r for r in fits if r.ByteSize() <= limit), key=lambda r: r.ByteSize())
        assert limit - 64 < req.ByteSize() <= limit
        call = grpc.insecure_channel(pair.addresses[0]).unary_unary("/engram.v1.EngramMemory/ApplyGradients")
        with pytest.raises(grpc.RpcError) as e:
            call(req.SerializeToString(), timeout=5, metadata=CLIENT_MD)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split it" in e.value.details()
        assert pair.shards[0].counters["updates"] == pair.shards[1].counters["updates"] == 0
        with pair.client() as client:  # the client's own pushes fit, forwarded and all
            client.push_gradients(np.arange(4000), np.ones((4000, 16), np.float32))
        assert pair.shards[0].checksum() == pair.shards[1].checksum()
    finally:
        pair.close()
